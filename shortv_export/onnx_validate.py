"""After export: the ONNX Runtime graphs against the PyTorch ShortV model, prefill and decode.

On a left-padded batch of 2 embedded samples (different lengths and images): the prefill's last-position logits
and hidden states, every ``present.*`` (the KV cache the frozen layers wrote too), then ``DECODE_STEPS`` greedy
decode steps fed PyTorch's tokens, comparing each step's logits and whether ONNX Runtime picks the same token.
The PyTorch side runs first, so the model can be freed before ONNX Runtime loads the graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ShortVError

# Allowed max |difference|, relative to the largest magnitude of what is compared (logits, or cache values).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
DECODE_STEPS = 4


def sample_inputs(processor, n: int = 2) -> dict:
    """A left-padded batch of ``n`` embedded calibration samples (different prompt lengths, image sizes)."""
    from .data import load_calibration, prompt_batch

    return prompt_batch(processor, load_calibration(None).samples[:: max(1, 40 // n)][:n])


def runner_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as the runner makes them: each row counts from 0 at its first token."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def torch_reference(model, inputs: dict, steps: int = DECODE_STEPS) -> dict[str, np.ndarray]:
    """What the PyTorch model computes for ``inputs``: prefill logits [B, V] and hidden states [B, S, D], the
    cache after prefill (``present.{i}.key|value``), and ``steps`` greedy decode steps (tokens [B, steps], each
    step's logits [steps, B, V])."""
    from transformers import DynamicCache

    from .compat import cache_kwarg, output_cache

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    mask = inputs["attention_mask"]
    mrope = "mm_token_type_ids" in inputs  # M-RoPE: the model's own 3-D positions, which the runner computes too
    positions = None if mrope else runner_positions(mask)
    cache = DynamicCache()  # full layers: the graph keeps every position, sliding windows live in its masks
    out = model(**inputs, position_ids=positions, use_cache=True, output_hidden_states=True, **{cache_kwarg(): cache})
    cache = output_cache(out)
    ref = {
        "logits": out.logits[:, -1].float().cpu().numpy(),
        "hidden": model.model.shortv_text_model().norm(out.hidden_states[-1]).float().cpu().numpy(),
    }
    for i, layer in enumerate(cache.layers):
        ref[f"present.{i}.key"] = layer.keys.float().cpu().numpy()
        ref[f"present.{i}.value"] = layer.values.float().cpu().numpy()
    kept = getattr(cache, "shortv_kept", None)  # token pruning: which cached prompt keys the pruned layers attend to
    if kept is not None:
        ref["pruned_mask"] = kept.ok.cpu().numpy()
    tokens, logits = [out.logits[:, -1].argmax(-1)], []
    position = None if mrope else positions[:, -1:]
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if mrope:  # as generate places a new token: its count of tokens, shifted by the prompt's rope delta
            position = (mask.sum(-1, keepdim=True) - 1 + model.model.rope_deltas).expand(3, -1, -1)
        else:
            position = position + 1
        step = model(
            input_ids=tokens[-1][:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{cache_kwarg(): cache},
        )
        logits.append(step.logits[:, -1].float().cpu().numpy())
        tokens.append(step.logits[:, -1].argmax(-1))
    ref["tokens"] = torch.stack(tokens, dim=1).cpu().numpy()  # the prefill's token, then one per step
    ref["decode_logits"] = np.stack(logits) if logits else np.zeros((0, *ref["logits"].shape), np.float32)
    return ref


def cache_diff(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
    """Max |a - b| of two [B, heads, K, head_dim] caches over the positions ``valid`` [B, K] marks: a padding
    position's keys and values are never attended to, and the two runtimes fill them differently."""
    keep = valid[:, None, :, None]
    return float(np.where(keep, np.abs(np.asarray(a, np.float32) - b), 0).max())


def validate_export(reference: dict, inputs: dict, onnx_dir: Path, provider: str = "cpu") -> dict:
    """Compare the graphs in ``onnx_dir`` with ``torch_reference(model, inputs)``; raise ShortVError past the
    tolerance, else return the figures."""
    from .onnx_runtime import ShortVOnnxModel

    runner = ShortVOnnxModel.from_pretrained(onnx_dir, provider=provider, io_binding=False)
    arrays = {k: v.numpy() for k, v in inputs.items()}
    feeds = runner.prefill_inputs(**arrays)
    logits, hidden, cache = runner.decode(feeds)
    valid = arrays["attention_mask"].astype(bool)
    dtype = runner.spec["dtype"]
    diff = lambda a, b: float(np.abs(np.asarray(a, np.float32) - b).max())  # noqa: E731
    presents = [name for name in reference if name.startswith("present.")]
    problems = []
    pruned_from = (runner.spec.get("shortv_prune") or {}).get("layer")

    def pruned(name):  # present.{i}.*: does layer i cache the kept rows only
        return pruned_from is not None and int(name.split(".")[1]) >= pruned_from

    if pruned_from is not None:  # the kept rows: the same in both, else the pruned layers' caches do not compare
        kept = np.asarray(cache["pruned_past_mask"]).astype(bool)
        if kept.shape != reference["pruned_mask"].shape or not (kept == reference["pruned_mask"]).all():
            problems.append("the tokens the pruned layers keep differ")
            presents = [n for n in presents if not pruned(n)]

    def valid_keys(name):
        return reference["pruned_mask"] if pruned(name) else valid

    figures = {
        "samples": int(valid.shape[0]),
        "tokens": int(valid.sum()),
        "decode_steps": int(reference["decode_logits"].shape[0]),
        "max_abs_logits_diff": diff(logits, reference["logits"]),
        "max_abs_hidden_diff": float(np.abs(hidden.astype(np.float32) - reference["hidden"])[valid].max()),
        "max_abs_present_diff": max(
            cache_diff(cache[n.replace("present", "past_key_values")], reference[n], valid_keys(n)) for n in presents
        ),
    }
    tokens = reference["tokens"]
    decode_diffs, agree = [], [bool((logits.argmax(-1) == tokens[:, 0]).all())]
    mask, position = feeds["attention_mask"], feeds["position_ids"][..., -1:]
    for step in range(figures["decode_steps"]):
        mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], axis=1)
        position = position + 1
        (embeds,) = runner.embed.run(None, {"input_ids": tokens[:, step : step + 1]})
        logits, _, cache = runner.decode(runner.step_inputs(embeds, mask, position, cache))
        decode_diffs.append(diff(logits, reference["decode_logits"][step]))
        agree.append(bool((logits.argmax(-1) == tokens[:, step + 1]).all()))
    scale = float(max(np.abs(reference["logits"]).max(), np.abs(reference["decode_logits"]).max())) or 1.0
    cache_scale = max(float(np.abs(reference[n]).max()) for n in presents) or 1.0
    figures.update(
        max_abs_decode_logits_diff=max(decode_diffs),
        greedy_tokens_agree=all(agree),
        logits_scale=scale,
        tolerance=TOLERANCE[dtype] * scale,
        present_tolerance=TOLERANCE[dtype] * cache_scale,
    )
    worst = max(figures["max_abs_logits_diff"], figures["max_abs_decode_logits_diff"])
    if not worst <= figures["tolerance"]:  # also catches NaN
        problems.append(f"max |logits diff| {worst:.3g} > tolerance {figures['tolerance']:.3g}")
    if not figures["max_abs_present_diff"] <= figures["present_tolerance"]:
        problems.append(
            f"max |KV cache diff| {figures['max_abs_present_diff']:.3g} > tolerance {figures['present_tolerance']:.3g}"
        )
    if problems:
        raise ShortVError(
            f"ONNX Runtime and PyTorch disagree on {figures['samples']} sample prompts (prefill and "
            f"{figures['decode_steps']} decode steps): {'; '.join(problems)}"
        )
    return figures
