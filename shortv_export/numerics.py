"""The numbers every stage computes alike: dtypes by name, and how far two next-token distributions are apart."""

from __future__ import annotations

import torch

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype: str, device: str | None, device_map: str | None) -> torch.dtype:
    """``--dtype``: 'auto' is fp32 on CPU and bf16 on GPUs."""
    if dtype != "auto":
        return DTYPES[dtype]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.float32 if device == "cpu" and device_map is None else torch.bfloat16


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q.to(log_p.device))).sum(-1)


def kl_and_top1(reference_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(P || P_ref) over rows and the share of rows whose argmax agrees, from last-position logits."""
    log_p, log_q = logits.double().log_softmax(-1), reference_logits.double().log_softmax(-1)
    mean_kl = float(kl(log_p, log_q).mean())
    return mean_kl, float((logits.argmax(-1) == reference_logits.argmax(-1)).double().mean())
