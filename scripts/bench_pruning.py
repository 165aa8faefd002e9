"""Token pruning (FastV, VTW) with and without ShortV on the CPU: prefill time against the FLOPs ideal, and decode
time per token and KV-cache bytes at a long prompt (docs/method.md section 5). Random weights, real layer shapes.

    python scripts/bench_pruning.py                        # prefill at LLaVA-1.5-7B shapes (8 layers), then decode
    python scripts/bench_pruning.py --prefill-shape small --runs 3 --decode-tokens 8

Prefill: vanilla, FastV (K=2, R=50%), ShortV (the late 5 of 8 layers, as scripts/bench_prefill.py) and both, one
model whose frozen layers and pruning are switched per run, the four arms interleaved run by run (median of --runs
after --warmup; no cache, logits_to_keep=1). Decode: a prompt of 3 images (3 x 576 visual + 64 text tokens) at
batch 1 and 8 on the small shape (1024 / 2816, 8 layers), vanilla vs FastV: the prefill's KV cache bytes, then
milliseconds per greedy decode step with the dynamic cache (median over --decode-tokens steps).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_spec = importlib.util.spec_from_file_location("bench_prefill", Path(__file__).with_name("bench_prefill.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

from shortv_export.compat import cache_kwarg  # noqa: E402
from shortv_export.flops import prefill_flops  # noqa: E402

FASTV = {"method": "fastv", "layer": 2, "ratio": 0.5}


def set_arm(model, layers, prune):
    model.model.shortv_layers, model.model.shortv_prune = list(layers), prune


def prefill_table(args) -> list[str]:
    model, frozen = bench.build(args.prefill_shape, args.depth, torch.float32, "cpu", FASTV)
    inputs = bench.prompts(args.prefill_shape, 1, model, "cpu")
    prefill = dict(inputs, logits_to_keep=1, use_cache=False)
    arms = {"vanilla": ([], None), "FastV K=2 R=50%": ([], FASTV), "ShortV": (frozen, None)}
    arms["ShortV + FastV"] = (frozen, FASTV)
    runs = {name: (lambda a=arm: set_arm(model, *a), lambda: model(**prefill)) for name, arm in arms.items()}
    with torch.no_grad():
        times = bench.interleaved(runs, args.runs, args.warmup, lambda: None)
    text_config = model.config.text_config
    n_visual = bench.SHAPES[args.prefill_shape][5]
    vanilla = prefill_flops(text_config, n_visual, bench.TEXT_TOKENS)
    rows = ["| arm | ms | speed-up | FLOPs ideal | of ideal |", "|---|---|---|---|---|"]
    for name, (layers, prune) in arms.items():
        ideal = vanilla / prefill_flops(text_config, n_visual, bench.TEXT_TOKENS, layers, prune)
        speedup = times["vanilla"] / times[name]
        rows.append(f"| {name} | {times[name] * 1e3:.0f} | {speedup:.2f}x | {ideal:.2f}x | {speedup / ideal:.0%} |")
    return rows


def long_prompt(model, batch: int, images: int = 3) -> dict:
    side = bench.IMAGE_SIDE.get("small", 24)
    image_token, vocab = model.config.image_token_id, model.config.text_config.vocab_size
    words = np.random.default_rng(0).integers(3, vocab - 2, bench.TEXT_TOKENS)
    row = np.concatenate([words[:5], np.full(images * side * side, image_token), words[5:]])
    ids = torch.from_numpy(row)[None].repeat(batch, 1)
    pixels = torch.randn(batch * images, 3, side, side, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


@torch.no_grad()
def decode(model, inputs: dict, steps: int) -> tuple[int, float]:
    """(KV cache bytes after the prefill, median ms per decode step)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    out = model(**inputs, **{cache_kwarg(): cache}, use_cache=True, logits_to_keep=1)
    size = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    mask, token, times = inputs["attention_mask"], out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        start = time.perf_counter()
        out = model(input_ids=token, attention_mask=mask, **{cache_kwarg(): cache}, use_cache=True)
        times.append(time.perf_counter() - start)
        token = out.logits[:, -1:].argmax(-1)
    return size, statistics.median(times) * 1e3


def decode_table(args) -> list[str]:
    model, _ = bench.build("small", 8, torch.float32, "cpu", FASTV)
    rows = ["| batch | arm | KV cache MB | decode ms/token |", "|---|---|---|---|"]
    warm = long_prompt(model, 1, images=1)
    for batch in (1, 8):
        inputs = long_prompt(model, batch)
        for name, prune in (("vanilla", None), ("FastV K=2 R=50%", FASTV)):
            set_arm(model, [], prune)
            decode(model, warm, 2)  # warm-up, on a short prompt
            size, ms = decode(model, inputs, args.decode_tokens)
            rows.append(f"| {batch} | {name} | {size / 2**20:.1f} | {ms:.2f} |")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill-shape", default="llava-1.5-7b", choices=sorted(bench.SHAPES))
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    print(bench.cpu_flags())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\nPrefill, {args.prefill_shape} shapes, {args.depth} layers, batch 1, fp32:")
    print("\n".join(prefill_table(args)))
    print("\nDecode after a 3-image prompt (1728 visual + 64 text tokens), small shape, 8 layers, fp32:")
    print("\n".join(decode_table(args)))


if __name__ == "__main__":
    main()
