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
