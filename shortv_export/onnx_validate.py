"""After export: the ONNX Runtime graphs against the PyTorch ShortV model on sample prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ShortVError

# Allowed max |difference| of the last position's logits, relative to their largest magnitude.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


def sample_inputs(processor, n: int = 2) -> dict:
    """A left-padded batch of ``n`` embedded calibration samples (different prompt lengths, image sizes)."""
    from .data import load_calibration, prompt_batch

    return prompt_batch(processor, load_calibration(None).samples[:: max(1, 40 // n)][:n])


@torch.no_grad()
def torch_prefill(model, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """Last-position logits [B, V] and last hidden states [B, S, D] of the PyTorch model, positions as the
    runner makes them."""
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model.model(**inputs, position_ids=positions)
    hidden = out.last_hidden_state
    logits = model.lm_head(hidden[:, -1])
    return logits.float().numpy(), hidden.float().numpy()


def validate_export(model, checkpoint: Path, onnx_dir: Path, provider: str = "cpu") -> dict:
    """Compare prefill and a few greedy tokens; raise ShortVError past the tolerance, else return the figures."""
    from transformers import AutoProcessor

    from .onnx_runtime import ShortVOnnxModel

    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)  # our own config class
    inputs = sample_inputs(processor)
    runner = ShortVOnnxModel.from_pretrained(onnx_dir, provider=provider)
    ref_logits, ref_hidden = torch_prefill(model, inputs)
    numpy_inputs = {k: v.numpy() for k, v in inputs.items()}
    feeds = runner.prefill_inputs(**numpy_inputs)
    logits, hidden, _ = runner.decode(feeds)
    valid = numpy_inputs["attention_mask"].astype(bool)
    scale = float(np.abs(ref_logits).max()) or 1.0
    logit_diff = float(np.abs(logits.astype(np.float32) - ref_logits).max())
    hidden_diff = float(np.abs(hidden.astype(np.float32) - ref_hidden)[valid].max())
    tolerance = TOLERANCE[runner.spec["dtype"]] * scale
    figures = {
        "samples": int(valid.shape[0]),
        "tokens": int(valid.sum()),
        "max_abs_logits_diff": logit_diff,
        "max_abs_hidden_diff": hidden_diff,
        "logits_scale": scale,
        "tolerance": tolerance,
        "top1_agree": bool((logits.argmax(-1) == ref_logits.argmax(-1)).all()),
    }
    if not logit_diff <= tolerance:  # also catches NaN
        raise ShortVError(
            f"ONNX Runtime and PyTorch disagree: max |logits diff| {logit_diff:.3g} > tolerance {tolerance:.3g} "
            f"on {figures['samples']} sample prompts"
        )
    return figures
