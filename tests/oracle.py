"""The independent ShortV oracle of docs/method.md section 1: the *stock* model, with each frozen layer run
densely and its visual rows then reset to the layer's input. Visual rows are the prefill positions whose
input id is the image token (given ``inputs_embeds``, those holding the image token's embedding, which is how
stock LLaVA places image features); decode steps carry no image token and so run unchanged."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def oracle_hooks(stock_model, frozen_layers, image_token_id: int, frozen_ids: list[int] | None = None):
    """Make a stock model of a supported family behave like ShortV with ``frozen_layers`` while inside.

    ``frozen_ids``: token ids whose rows freeze (default: the image token, and the video token where the model
    has one)."""
    if frozen_ids is None:
        video = getattr(stock_model.config, "video_token_id", None)
        frozen_ids = [image_token_id] + ([video] if video is not None else [])
    ids = torch.tensor(frozen_ids)
    state = {"rows": None}
    base = stock_model.model

    def capture(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if input_ids is not None:
            state["rows"] = torch.isin(input_ids, ids.to(input_ids.device))
        elif embeds is not None:
            table = base.get_input_embeddings()(ids.to(embeds.device))  # [n ids, D]
            state["rows"] = (embeds[:, :, None, :] == table).all(-1).any(-1)
        else:
            state["rows"] = None

    def reset(_module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        rows = state["rows"]
        if rows is None or rows.shape != hidden_in.shape[:2]:
            return output
        return torch.where(rows.unsqueeze(-1), hidden_in, output)

    handles = [base.register_forward_pre_hook(capture, with_kwargs=True)]
    layers = (base.language_model if "language_model" in base._modules else base.text_model).layers
    # prepend: reset before transformers' own hooks record the layer output as a hidden state
    handles += [layers[i].register_forward_hook(reset, with_kwargs=True, prepend=True) for i in frozen_layers]
    try:
        yield stock_model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def pruning_oracle_hooks(stock_model, prune: dict, visual_ids: list[int], rank_position: int | None = None):
    """Make a stock model (eager attention, no cache, one unpadded row per call) prune tokens as FastV / VTW do
    (docs/method.md section 5) while inside: for FastV, the eager attention map of layer K-1 (the stock one, as
    the reference code reads it) ranks the visual positions by what the row at ``rank_position`` (default: the
    last) pays them, averaged over heads, ties to the earlier; from layer K on, the removed positions are masked
    out of every layer's attention (no row attends to them: as if they were gone; every position keeps its
    position id). Combine with ``oracle_hooks`` for ShortV layers."""
    layers = _layers(stock_model)
    state = {}

    def capture_ids(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        state["visual"] = torch.isin(input_ids[0], torch.tensor(visual_ids))
        state.pop("removed", None)

    def rank(_module, _args, output):
        weights = output[1]  # [1, heads, S, S], eager
        at = weights.shape[2] - 1 if rank_position is None else rank_position
        score = weights[0, :, at, :].mean(0).masked_fill(~state["visual"], float("-inf"))
        order = torch.sort(score, descending=True, stable=True).indices
        kept = order[: round((1 - prune["ratio"]) * int(state["visual"].sum()))]
        removed = state["visual"].clone()
        removed[kept] = False
        state["removed"] = removed

    def mask_out(_module, args, kwargs):
        if "removed" not in state:  # VTW: every visual token
            state["removed"] = state["visual"]
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dtype != torch.bool
        kwargs["attention_mask"] = mask.masked_fill(state["removed"], torch.finfo(mask.dtype).min)
        return args, kwargs

    handles = [stock_model.model.register_forward_pre_hook(capture_ids, with_kwargs=True)]
    k = prune["layer"]
    if prune["method"] == "fastv":
        handles.append(layers[k - 1].self_attn.register_forward_hook(rank))
    handles += [layers[i].register_forward_pre_hook(mask_out, with_kwargs=True) for i in range(k, len(layers))]
    try:
        yield stock_model
    finally:
        for h in handles:
            h.remove()


def _layers(stock_model):
    base = stock_model.model
    return (base.language_model if "language_model" in base._modules else base.text_model).layers


def oracle_generate(stock_model, inputs: dict, steps: int, suppress: list[int] = ()) -> torch.Tensor:
    """Greedy generation of one unpadded row with no cache, never choosing the ``suppress`` tokens: every step
    runs the whole sequence again (inside the hooks the caller holds, which rank at the prompt's last token)."""
    inputs = dict(inputs)
    ids = inputs["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            logits = stock_model(**inputs, use_cache=False).logits[:, -1]
        logits[:, list(suppress)] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        grow = {k: v for k, v in inputs.items() if torch.is_tensor(v) and v.shape[:2] == inputs["input_ids"].shape}
        for key, value in grow.items():
            pad = torch.ones_like(value[:, :1]) if key == "attention_mask" else torch.zeros_like(value[:, :1])
            inputs[key] = torch.cat([value, pad], dim=1)
        inputs["input_ids"] = ids
    return ids
