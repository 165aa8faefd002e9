"""Prefill latency of vanilla vs ShortV at real LLaVA layer shapes (random weights), against the FLOPs ideal.

    python scripts/bench_prefill.py                                        # CPU: LLaVA-1.5-7B shapes, 8 layers
    python scripts/bench_prefill.py --backend torch,onnx --dtype fp32,bf16 # CPU, PyTorch and ONNX Runtime
    python scripts/bench_prefill.py --device cuda --shape all --depth full --batch 1,8   # GPU: the issue's table
    python scripts/bench_prefill.py --shape launch --depth full --runs 40 --compile eager  # CPU cost of issuing
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python scripts/bench_prefill.py

The decoder has the real hidden/MLP/head sizes and is built directly on the device in the target dtype (a
full-depth 13B takes seconds on a GPU). At full depth the frozen layers are the published lists (docs/method.md
section 3); at reduced depth the late round(depth * N/L) layers. Each prompt row is 5 + 59 text tokens around the
shape's visual tokens (576 per image; LLaVA-NeXT shapes: 5 images, 2880 tokens), through a token-sized vision tower, so
the timing is the decoder's. Vanilla is the same model with no frozen layers (the stock code path). The launch
shape is LLaVA-1.5-13B's 40 layers and published list at a negligible width: its time is what the CPU spends issuing
a prefill, which a launch-bound GPU prefill at batch 1 waits on. The last line caps the instruction set to AVX2 (an
AVX2-only CPU, as far as PyTorch, oneDNN and MKL are concerned).

Rows: eager prefill (median of --runs after --warmup, vanilla and ShortV interleaved, logits_to_keep=1, no
cache), a compiled prefill at batch 1
(``torch.compile(model.forward, fullgraph=True)``; on CUDA the default backend is ``cudagraphs``: CUDA graphs
without inductor codegen, the launch-bound case), and prefill + --decode-tokens greedy tokens end to end
(``generate``). Above the tables: the CPU flags, and the dispatch counts (aten operations per frozen layer vs
a stock layer, host syncs per forward) that decide launch-bound latency on a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:  # installed, the repo's modeling/ is shortv_export.modeling
    import shortv_export.modeling  # noqa: F401
except ImportError:  # a plain checkout (the GPU machine): the same folder under that name
    import modeling

    sys.modules["shortv_export.modeling"] = modeling

from shortv_export.flops import prefill_flops  # noqa: E402
from shortv_export.overhead import dispatched  # noqa: E402
from shortv_export.select import PAPER_LAYERS  # noqa: E402

# name: (hidden, intermediate, heads, kv heads, vocab, visual tokens, full depth, published layer list)
SHAPES = {
    "llava-1.5-7b": (4096, 11008, 32, 32, 32064, 576, 32, PAPER_LAYERS["llava-hf/llava-1.5-7b-hf"]),
    "llava-1.5-13b": (5120, 13824, 40, 40, 32064, 576, 40, PAPER_LAYERS["llava-hf/llava-1.5-13b-hf"]),
    "llava-next-7b": (4096, 11008, 32, 32, 32064, 2880, 32, PAPER_LAYERS["llava-hf/llava-v1.6-vicuna-7b-hf"]),
    "llava-next-13b": (5120, 13824, 40, 40, 32064, 2880, 40, PAPER_LAYERS["llava-hf/llava-v1.6-vicuna-13b-hf"]),
    "small": (1024, 2816, 16, 16, 32064, 576, 8, None),
    # LLaVA-1.5-13B's 40 layers and published list at a negligible width and 16 visual tokens: the time is the CPU's
    # cost of issuing the forward (Python, dispatch), what a launch-bound GPU prefill at batch 1 waits on
    "launch": (16, 32, 2, 2, 32064, 16, 40, PAPER_LAYERS["llava-hf/llava-1.5-13b-hf"]),
}
IMAGE_SIDE = {"launch": 4}  # px per image side (1 px patches); others 24: 576 features, as a 336 px CLIP-L/14 image
TEXT_TOKENS = 64
# environment variables that cap the instruction set (aten kernels, oneDNN, MKL): an AVX2-only CPU, emulated
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_layers(shape: str, depth: int) -> list[int]:
    *_, full, published = SHAPES[shape]
    if depth == full and published:
        return list(published)
    share = len(published) / full if published else 19 / 32
    return list(range(depth - round(depth * share), depth))


def build(shape: str, depth: int, dtype: torch.dtype, device: str, prune: dict | None = None):
    """A ShortV LLaVA with the shape's language model (random weights), built on ``device`` in ``dtype``, with
    token pruning ``prune`` (the config's shortv_prune) if given."""
    from shortv_export.modeling.configuration_shortv import ShortVLlavaConfig
    from shortv_export.modeling.modeling_shortv_llava import ShortVLlavaForConditionalGeneration
    from transformers import CLIPVisionConfig, LlamaConfig

    hidden, inter, heads, kv, vocab, *_ = SHAPES[shape]
    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=depth,
        vocab_size=vocab,
        max_position_embeddings=8192,
        pad_token_id=0,
    )
    side = IMAGE_SIDE.get(shape, 24)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=side, patch_size=1
    )
    frozen = frozen_layers(shape, depth)
    config = ShortVLlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=vocab - 1,
        shortv_layers=frozen,
        vision_feature_layer=-1,
        shortv_prune=prune,
    )
    config._attn_implementation = config.text_config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = ShortVLlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.pad_token_id = 0
    return model.eval(), frozen


def prompts(shape: str, batch: int, model, device: str) -> dict:
    """``batch`` identical rows: 5 text tokens, the images' tokens, 59 text tokens; pixels for the images."""
    n_visual = SHAPES[shape][5]
    vocab, image_token = model.config.text_config.vocab_size, model.config.image_token_id
    words = np.random.default_rng(0).integers(3, vocab - 2, TEXT_TOKENS)
    row = np.concatenate([words[:5], np.full(n_visual, image_token), words[5:]])
    ids = torch.from_numpy(row)[None].repeat(batch, 1).to(device)
    side = IMAGE_SIDE.get(shape, 24)
    images = batch * n_visual // side**2
    pixels = torch.randn(images, 3, side, side, generator=torch.Generator().manual_seed(0))
    dtype = next(model.parameters()).dtype
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels.to(device, dtype)}


def interleaved(arms: dict, runs: int, warmup: int, sync) -> dict:
    """Median seconds of each arm's ``fn()`` (arms: name -> (prepare, fn); ``prepare`` runs untimed before each
    call), the arms taking turns run by run, so that a machine's drift hits them alike."""
    times = {name: [] for name in arms}
    for i in range(warmup + runs):
        for name, (prepare, fn) in arms.items():
            prepare()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def timed_pair(model, frozen, fn, runs: int, warmup: int, sync) -> dict:
    """Median seconds of ``fn()`` as vanilla (no frozen layers) and as ShortV, interleaved."""
    arms = {
        name: (lambda layers=layers: set_frozen(model, layers), fn)
        for name, layers in (("vanilla", []), ("shortv", frozen))
    }
    result = interleaved(arms, runs, warmup, sync)
    set_frozen(model, frozen)
    return result


def set_frozen(model, frozen):
    model.model.shortv_layers = list(frozen)  # [] takes the stock path in every layer


@torch.no_grad()
def bench_torch(model, frozen, inputs, args, device: str, compile_backend: str | None) -> dict:
    """Seconds per prefill (eager, and compiled at batch 1) and per prefill + decode, vanilla and ShortV."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    batch = inputs["input_ids"].shape[0]
    prefill = dict(inputs, logits_to_keep=1, use_cache=False)
    gen = dict(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False)
    result = timed_pair(model, frozen, lambda: model(**prefill), args.runs, args.warmup, sync)
    if compile_backend and batch == 1:  # one compiled forward, a graph per arm (dynamo guards on the frozen list)
        torch._dynamo.reset()
        mode = "reduce-overhead" if compile_backend == "inductor" and device.startswith("cuda") else None
        compiled = torch.compile(model.forward, fullgraph=True, backend=compile_backend, mode=mode)
        timings = timed_pair(model, frozen, lambda: compiled(**prefill), args.runs, args.warmup + 2, sync)
        result.update({f"{name}_compiled": t for name, t in timings.items()})
    if args.decode_tokens:
        e2e = timed_pair(model, frozen, lambda: model.generate(**inputs, **gen), max(1, args.runs // 3), 1, sync)
        result.update({f"{name}_e2e": t for name, t in e2e.items()})
    return result


def onnx_sessions(model, frozen, workdir: Path) -> dict:
    """The decoder exported (fp32) vanilla and ShortV into ``workdir``: name -> ONNX Runtime CPU session. Exported
    once per model: the graphs take any batch and length."""
    import onnxruntime as ort

    from shortv_export.onnx_export import _export_decoder

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # both sessions live at once (interleaved): an idle one's threads must not spin on the cores the other uses
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    dtype = next(model.parameters()).dtype
    sessions = {}
    for name, layers in (("vanilla", []), ("shortv", frozen)):
        set_frozen(model, layers)
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        _export_decoder(model.float(), folder)
        model.to(dtype)  # the torch rows that follow run in their own dtype
        path = str(folder / "decoder_model_merged.onnx")
        sessions[name] = ort.InferenceSession(path, options, ["CPUExecutionProvider"])
    set_frozen(model, frozen)
    return sessions


def bench_onnx(sessions: dict, model, inputs, args) -> dict:
    """Seconds per prefill of the exported decoders (`onnx_sessions`), vanilla and ShortV."""
    from shortv_export.onnx_runtime import text_index

    ids = inputs["input_ids"].cpu()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).float().numpy()
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    feeds = {
        "inputs_embeds": embeds,
        "attention_mask": np.ones(ids.shape, np.int64),
        "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None].repeat(ids.shape[0], 0),
        "text_index": text_index((ids == model.config.image_token_id).numpy()),
    }
    empty = np.zeros((ids.shape[0], text.num_key_value_heads, 0, head_dim), np.float32)
    feeds.update({f"past_key_values.{i}.{kv}": empty for i in range(text.num_hidden_layers) for kv in ("key", "value")})
    arms = {name: (lambda: None, lambda s=session: s.run(["logits"], feeds)) for name, session in sessions.items()}
    return interleaved(arms, args.runs, args.warmup, lambda: None)


def dispatch_counts(model, frozen, inputs) -> str:
    """One line: aten ops in a frozen layer vs its stock layer, kernels and host syncs per forward, ShortV vs
    vanilla."""
    kw = dict(logits_to_keep=1, use_cache=False)
    vanilla, shortv = dispatched(model, inputs, [], **kw), dispatched(model, inputs, frozen, **kw)
    first, later = min(frozen), max(frozen)
    stock = vanilla.per_layer[later]
    return (
        f"aten ops in frozen layer {later}: {shortv.per_layer[later]} vs stock {stock} "
        f"(+{shortv.per_layer[later] - stock}; the first frozen layer {first}: "
        f"+{shortv.per_layer[first] - vanilla.per_layer[first]}, with the text rows' cos/sin, once per forward); "
        f"kernels per forward (not views or bare allocations): ShortV {shortv.kernels}, vanilla {vanilla.kernels}; "
        f"host syncs per forward: ShortV {shortv.syncs}, vanilla {vanilla.syncs}"
    )


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    shown = " ".join(shown) + ("" if "avx512_bf16" in flags or "amx_bf16" in flags else " (bf16 matmuls emulated)")
    capped = [f"{k}={os.environ[k]}" for k in ISA_CAPS if k in os.environ]
    used = f"; PyTorch kernels use {torch.backends.cpu.get_cpu_capability()}"
    return shown + used + (f" (capped: {' '.join(capped)})" if capped else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llava-1.5-7b", help=f"comma list of {', '.join(SHAPES)}, or all")
    parser.add_argument("--depth", default="8", help="decoder layers to build, or 'full'")
    parser.add_argument("--batch", default="1", help="comma list of batch sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backend", default="torch", help="comma list of torch, onnx (onnx: CPU, fp32)")
    parser.add_argument("--dtype", default=None, help="comma list of fp32, bf16, fp16 [cpu: fp32; cuda: bf16]")
    parser.add_argument("--compile", default=None, help="torch.compile backend for batch 1 [cuda: cudagraphs]; none")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=32, help="prefill + this many tokens; 0 skips")
    args = parser.parse_args(argv)
    shapes = [s for s in SHAPES if s not in ("small", "launch")] if args.shape == "all" else args.shape.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    cuda = args.device.startswith("cuda")
    dtypes = (args.dtype or ("bf16" if cuda else "fp32")).split(",")
    compile_backend = args.compile or ("cudagraphs" if cuda else "none")
    compile_backend = None if compile_backend == "none" else compile_backend
    backends = args.backend.split(",")

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"# {machine}, CPU flags: {cpu_flags()}")
    if cuda:
        print(f"# GPU: {torch.cuda.get_device_name()}")
    print(f"# median of {args.runs} runs after {args.warmup} warm-ups; {TEXT_TOKENS} text tokens per row; SDPA")
    rows, notes = [], []
    for shape in shapes:
        depth = SHAPES[shape][6] if args.depth == "full" else int(args.depth)
        for dtype in dtypes:
            start = time.perf_counter()
            model, frozen = build(shape, depth, DTYPES[dtype], args.device)
            built = time.perf_counter() - start
            workdir = tempfile.TemporaryDirectory()
            sessions = None  # the ONNX graphs, exported at the first batch
            for batch in batches:
                inputs = prompts(shape, batch, model, args.device)
                flops = [
                    prefill_flops(model.config.text_config, SHAPES[shape][5], TEXT_TOKENS, f) for f in ([], frozen)
                ]
                ideal = flops[0] / flops[1]
                if batch == batches[0]:
                    notes.append(f"{shape} {dtype} (built in {built:.1f} s): {dispatch_counts(model, frozen, inputs)}")
                cell = dict(shape=shape, depth=depth, frozen=len(frozen), batch=batch, dtype=dtype, ideal=ideal)
                if "torch" in backends:
                    r = bench_torch(model, frozen, inputs, args, args.device, compile_backend)
                    rows.append(dict(cell, backend=f"torch {args.device}", **r))
                if "onnx" in backends and not cuda:
                    sessions = sessions or onnx_sessions(model, frozen, Path(workdir.name))
                    r = bench_onnx(sessions, model, inputs, args)
                    rows.append(dict(cell, backend="onnxruntime cpu", dtype="fp32", **r))
            del model, sessions
            workdir.cleanup()
            if cuda:
                torch.cuda.empty_cache()
    print()
    for note in notes:
        print(f"# {note}")
    print()
    columns = (
        "shape | frozen | batch | backend | dtype | mode | vanilla ms | ShortV ms | speed-up | FLOPs ideal | of ideal"
    )
    print(f"| {columns} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for mode, suffix in (("eager", ""), (f"compiled ({compile_backend})", "_compiled"), ("+32 tokens", "_e2e")):
            if f"vanilla{suffix}" not in r:
                continue
            if suffix == "_e2e":
                mode = f"prefill + {args.decode_tokens} tokens"
            v, s = r[f"vanilla{suffix}"], r[f"shortv{suffix}"]
            ideal = r["ideal"] if suffix != "_e2e" else float("nan")
            share = f"{v / s / ideal:.0%}" if suffix != "_e2e" else "-"
            print(
                f"| {r['shape']} | {r['frozen']}/{r['depth']} | {r['batch']} | {r['backend']} | {r['dtype']} | {mode} "
                f"| {v * 1e3:.1f} | {s * 1e3:.1f} | {v / s:.2f}x | {r['ideal']:.2f}x | {share} |"
            )


if __name__ == "__main__":
    main()
