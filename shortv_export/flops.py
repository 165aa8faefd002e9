"""Prefill FLOPs of the decoder layers, vanilla and ShortV (docs/method.md section 4).

2 FLOPs per multiply-add, decoder layers only (no vision tower, embeddings, norms or lm_head): the Q, K, V, O
projections (K/V sized by the KV heads), attention scores and the weighted sum (every query against every
key of the prompt, the usual dense count), and the three SwiGLU MLP matrices. A ShortV layer keeps K/V for all
n tokens but runs Q, O, the attention rows and the MLP for the n_t text tokens only. With token pruning
(``prune``: the config's ``shortv_prune``, docs/method.md section 5) the layers from ``prune["layer"]`` on see only
the text tokens and the visual tokens kept there: round((1 - ratio) x n_visual) for FastV, none for VTW; a ShortV
layer among them freezes the kept ones. FastV's ranking (one query row against the keys of layer K-1) is not
counted, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _dims(text_config: Any) -> tuple[int, int, int, int, int]:
    get = text_config.get if isinstance(text_config, dict) else lambda k, d=None: getattr(text_config, k, d)
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or hidden // heads)
    return hidden, heads, kv_heads, head_dim, int(get("intermediate_size"))


def layer_flops(text_config: Any, n_queries: int, n_keys: int) -> int:
    """FLOPs of one decoder layer where ``n_queries`` of the ``n_keys`` prompt tokens are queries."""
    hidden, heads, kv_heads, head_dim, ffn = _dims(text_config)
    kv = 2 * 2 * n_keys * hidden * kv_heads * head_dim  # K and V projections, every token
    q_o = 2 * 2 * n_queries * hidden * heads * head_dim  # Q and O projections
    attention = 2 * 2 * n_queries * n_keys * heads * head_dim  # scores and weighted sum
    mlp = 3 * 2 * n_queries * hidden * ffn
    return kv + q_o + attention + mlp


def kept_visual(n_visual: int, prune: dict | None, layer: int) -> int:
    """Visual tokens still in the sequence at decoder ``layer`` under ``prune`` (None: no pruning)."""
    if not prune or layer < prune["layer"]:
        return n_visual
    return round((1 - prune["ratio"]) * n_visual) if prune["method"] == "fastv" else 0


def prefill_flops(
    text_config: Any, n_visual: int, n_text: int, frozen_layers: Iterable[int] = (), prune: dict | None = None
) -> int:
    """Prefill FLOPs of all decoder layers for a prompt of ``n_visual`` + ``n_text`` tokens."""
    get = text_config.get if isinstance(text_config, dict) else lambda k: getattr(text_config, k)
    num_layers = int(get("num_hidden_layers"))
    frozen = set(frozen_layers)
    if not frozen <= set(range(num_layers)):
        raise ValueError(f"frozen layers {sorted(frozen)} out of range for {num_layers} layers")
    total = 0
    for layer in range(num_layers):
        n = n_text + kept_visual(n_visual, prune, layer)
        total += layer_flops(text_config, n_text if layer in frozen else n, n)
    return total


def flops_summary(
    text_config: Any, n_visual: int, n_text: int, frozen_layers: Iterable[int], prune: dict | None = None
) -> dict[str, float]:
    """Vanilla and ShortV TFLOPs (with ``prune``'s token pruning, if any), their ratio and the ideal prefill
    speed-up (1 / ratio)."""
    vanilla = prefill_flops(text_config, n_visual, n_text)
    shortv = prefill_flops(text_config, n_visual, n_text, frozen_layers, prune)
    return {
        "n_visual": n_visual,
        "n_text": n_text,
        "vanilla_tflops": vanilla / 1e12,
        "shortv_tflops": shortv / 1e12,
        "ratio": shortv / vanilla,
        "ideal_speedup": vanilla / shortv,
    }


def format_flops(tflops: float) -> str:
    """TFLOPs in a unit that fits: '8.50 TFLOPs', '3.2 GFLOPs', '41.7 MFLOPs'."""
    if tflops >= 0.1:
        return f"{tflops:.2f} TFLOPs"
    if tflops >= 1e-4:
        return f"{tflops * 1e3:.3g} GFLOPs"
    return f"{tflops * 1e6:.3g} MFLOPs"
