"""Prefill latency of vanilla vs ShortV at real LLaVA layer shapes (random weights), against the FLOPs ideal.

    python scripts/bench_prefill.py                                    # LLaVA-1.5-7B shapes, CPU, torch + ORT
    python scripts/bench_prefill.py --shape llava-next-7b --depth 4 --backend torch --dtype bf16
    python scripts/bench_prefill.py --shape small --backend onnx       # a quick look

The decoder keeps the real hidden/MLP/head sizes; depth is reduced (--depth) to fit time and memory, freezing
round(depth * 19/32) layers (the paper's share for LLaVA-1.5-7B). Vanilla is the same model with no frozen
layers (the stock code path). Each cell is the median of --runs timed prefills after --warmup. Decode: tokens/s
over --decode-tokens greedy steps after the prefill (torch only; ShortV runs the stock layers in decode).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shortv_export.compat import cache_kwarg, output_cache  # noqa: E402
from shortv_export.flops import prefill_flops  # noqa: E402

SHAPES = {  # name: (hidden, intermediate, heads, kv heads, vocab, visual tokens, full depth)
    "llava-1.5-7b": (4096, 11008, 32, 32, 32064, 576, 32),
    "llava-1.5-13b": (5120, 13824, 40, 40, 32064, 576, 40),
    "llava-next-7b": (4096, 11008, 32, 32, 32064, 2880, 32),
    "small": (1024, 2816, 16, 16, 32064, 576, 8),
}
FROZEN_SHARE = 19 / 32
TEXT_TOKENS = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(shape: str, depth: int, dtype: torch.dtype):
    """A ShortV LLaVA with the shape's language model (random weights) and a token-sized vision tower."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from shortv_export.models import ShortVLlavaConfig, ShortVLlavaForConditionalGeneration

    hidden, inter, heads, kv, vocab, _, _ = SHAPES[shape]
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=depth,
        vocab_size=vocab,
        max_position_embeddings=8192,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    frozen = list(range(depth - round(depth * FROZEN_SHARE), depth))  # the late layers, as LC usually picks
    config = ShortVLlavaConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1, shortv_layers=frozen)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = ShortVLlavaForConditionalGeneration(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        model.model.language_model.rotary_emb.__init__(text)  # non-persistent buffers live on meta until rebuilt
    return model.to(dtype).eval(), frozen


def prompt(n_visual: int, vocab: int, image_token: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    words = rng.integers(3, vocab - 2, TEXT_TOKENS)
    ids = np.concatenate([words[:5], np.full(n_visual, image_token), words[5:]])
    return torch.from_numpy(ids)[None]


def timed(fn, runs: int, warmup: int, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def set_frozen(model, frozen):
    model.model.shortv_layers = list(frozen)  # [] takes the stock path everywhere (no shortv argument)


@torch.no_grad()
def bench_torch(model, frozen, ids, runs, warmup, device, decode_tokens):
    model.to(device)
    ids = ids.to(device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    images = image_features(model, ids)
    result = {}
    for name, layers in (("vanilla", []), ("shortv", frozen)):
        set_frozen(model, layers)
        prefill = lambda: model(input_ids=ids, attention_mask=mask, logits_to_keep=1, mm_encoder_outputs=images)  # noqa: E731
        result[name] = timed(prefill, runs, warmup, sync)
        if decode_tokens:
            result[f"{name}_decode_tps"] = decode_tokens / decode_time(model, ids, mask, decode_tokens, runs, sync)
    set_frozen(model, frozen)
    return result


def image_features(model, ids) -> dict:
    """Pre-computed image features (random) for the prompt's image tokens, as generate() passes them: the
    prefill carries images, so ShortV freezes their rows; the vision tower is left out of the timing."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    n_visual = int((ids == model.config.image_token_id).sum())
    dtype = next(model.parameters()).dtype
    features = torch.randn(n_visual, model.config.text_config.hidden_size, dtype=dtype, device=ids.device) * 0.02
    return {"image": BaseModelOutputWithPooling(pooler_output=[features])}


def decode_time(model, ids, mask, tokens, runs, sync) -> float:
    """Median time of ``tokens`` greedy decode steps after an (untimed) prefill."""
    times = []
    images = image_features(model, ids)
    for _ in range(max(2, runs // 2) + 1):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, mm_encoder_outputs=images)
        cache, token, attention = output_cache(out), out.logits[:, -1:].argmax(-1), mask
        sync()
        start = time.perf_counter()
        for _ in range(tokens):
            attention = torch.cat([attention, torch.ones_like(token)], dim=1)
            out = model(input_ids=token, attention_mask=attention, use_cache=True, **{cache_kwarg(): cache})
            cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first is warm-up


def bench_onnx(model, frozen, ids, runs, warmup, provider, workdir: Path):
    import onnxruntime as ort

    from shortv_export.onnx_export import _export_decoder
    from shortv_export.onnx_runtime import text_index

    image_token = model.config.image_token_id
    visual = (ids == image_token).numpy()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).float().numpy()
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    feeds = {
        "inputs_embeds": embeds,
        "attention_mask": np.ones(ids.shape, np.int64),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None],
        "text_index": text_index(visual),
    }
    empty = np.zeros((1, text.num_key_value_heads, 0, head_dim), np.float32)
    feeds.update({f"past_key_values.{i}.{kv}": empty for i in range(text.num_hidden_layers) for kv in ("key", "value")})
    result = {}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for name, layers in (("vanilla", []), ("shortv", frozen)):
        set_frozen(model, layers)
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        _export_decoder(model.float(), folder)
        session = ort.InferenceSession(str(folder / "decoder_model_merged.onnx"), options, providers=[provider])
        result[name] = timed(lambda s=session: s.run(["logits"], feeds), runs, warmup)
        del session
    set_frozen(model, frozen)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5-7b", choices=SHAPES)
    parser.add_argument("--depth", type=int, help="decoder layers to build [default: 4, or the full depth of small]")
    parser.add_argument("--backend", default="torch,onnx", help="comma list of torch, onnx, cuda")
    parser.add_argument("--dtype", default="fp32,bf16", help="comma list for torch on CPU (onnx runs fp32)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=32, help="0 skips the decode measurement")
    args = parser.parse_args(argv)
    hidden, inter, heads, kv, vocab, n_visual, full = SHAPES[args.shape]
    depth = args.depth or (full if args.shape == "small" else 4)
    backends = args.backend.split(",")
    print(f"# {args.shape}: hidden {hidden}, MLP {inter}, {heads} heads, {n_visual} visual + {TEXT_TOKENS} text")
    print(f"# depth {depth} (of {full}), frozen {round(depth * FROZEN_SHARE)}; median of {args.runs} runs")
    print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    rows = []
    cells = [("torch", d, "cpu") for d in args.dtype.split(",") if "torch" in backends]
    if "onnx" in backends:
        cells.append(("onnx", "fp32", "CPUExecutionProvider"))
    if "cuda" in backends and torch.cuda.is_available():
        cells.append(("torch", "bf16", "cuda"))
        print(f"# GPU: {torch.cuda.get_device_name()}")
    model = None
    for backend, dtype, device in cells:
        if model is None or next(model.parameters()).dtype != DTYPES[dtype]:
            model = None
            model, frozen = build(args.shape, depth, DTYPES[dtype])
        ids = prompt(n_visual, vocab, model.config.image_token_id)
        flops = [prefill_flops(model.config.text_config, n_visual, TEXT_TOKENS, f) for f in ([], frozen)]
        ideal = flops[0] / flops[1]
        if backend == "torch":
            r = bench_torch(model, frozen, ids, args.runs, args.warmup, device, args.decode_tokens)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                r = bench_onnx(model, frozen, ids, args.runs, args.warmup, device, Path(tmp))
        speedup = r["vanilla"] / r["shortv"]
        rows.append((backend, dtype, device, r, speedup, ideal))
        model.to("cpu")
    print()
    print(
        "| backend | dtype | device | vanilla ms | ShortV ms | speed-up | FLOPs ideal | of ideal "
        "| decode tok/s (vanilla / ShortV) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for backend, dtype, device, r, speedup, ideal in rows:
        decode = f"{r['vanilla_decode_tps']:.2f} / {r['shortv_decode_tps']:.2f}" if "vanilla_decode_tps" in r else "-"
        print(
            f"| {backend} | {dtype} | {device} | {r['vanilla'] * 1e3:.0f} | {r['shortv'] * 1e3:.0f} | "
            f"{speedup:.2f}x | {ideal:.2f}x | {speedup / ideal:.0%} | {decode} |"
        )


if __name__ == "__main__":
    main()
