"""LC calibration cost: prefix reuse (shortv_export.calibrate) vs brute force (one full forward per layer).

    python scripts/bench_calibration.py                          # 24-layer random LLaVA, hidden 256, 40 samples
    python scripts/bench_calibration.py --layers 12 --hidden 64 --samples 20 --batch-size 1,8

Each method runs in its own process so that its peak memory (max RSS; CUDA max allocated on GPU) is its own.
Brute force: for every layer l, the stock model runs the whole prompt batch with layer l's visual rows reset to
the layer input (the oracle), and KL to the original next-token distribution is averaged. Both give the same
LC (the test suite checks it to 1e-4); this script prints wall time, decoder-layer forwards and peak memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def brute_force(model, processor, calib, batch_size: int) -> tuple[list[float], int]:
    from shortv_export.calibrate import _batches
    from shortv_export.data import format_prompt
    from shortv_export.numerics import kl

    layers = model.model.language_model.layers
    totals = [0.0] * len(layers)
    forwards = 0
    tok = processor.tokenizer
    tok.padding_side = "left"
    for samples in _batches(calib, batch_size):
        inputs = processor(
            images=[s.load_image() for s in samples],
            text=[format_prompt(processor, s.prompt) for s in samples],
            return_tensors="pt",
            padding=True,
        ).to(model.device)
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        visual = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        with torch.no_grad():
            reference = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)
            forwards += len(layers)
            for i, layer in enumerate(layers):

                def reset(_m, args, kwargs, output, visual=visual):
                    hidden_in = args[0] if args else kwargs["hidden_states"]
                    return torch.where(visual, hidden_in, output)

                handle = layer.register_forward_hook(reset, with_kwargs=True, prepend=True)
                try:
                    out = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1]
                finally:
                    handle.remove()
                forwards += len(layers)
                totals[i] += float(kl(out.float().log_softmax(-1), reference).double().sum())
    n = len(calib.samples)
    return [t / n for t in totals], forwards


def worker(args) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from shortv_export.calibrate import calibrate
    from shortv_export.data import load_calibration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(args.model, attn_implementation="sdpa").to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    calib = load_calibration(None, samples=args.samples, seed=0)
    for s in calib.samples:
        s.load_image()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.worker == "fast":
        lc = calibrate(model, processor, calib, batch_size=args.batch_size, progress=False)
        values, forwards = lc.visual, lc.calibration["layer_forwards"]
    else:
        values, forwards = brute_force(model, processor, calib, args.batch_size)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    print(json.dumps({"seconds": seconds, "forwards": forwards, "peak_rss_mib": peak, "gpu_mib": gpu, "lc": values}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--batch-size", default="1,8", help="comma list")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["fast", "brute"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.batch_size = int(args.batch_size)
        return worker(args)

    from shortv_export.tiny import save_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny(Path(tmp) / "model", "llava", num_layers=args.layers, hidden=args.hidden, image_size=56)
        print(f"# random LLaVA: {args.layers} layers, hidden {args.hidden}, 64 visual tokens; {args.samples} samples")
        print(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        print()
        print("| method | batch | seconds | layer forwards | peak RSS MiB | GPU MiB | max rel. LC diff |")
        print("|---|---|---|---|---|---|---|")
        for batch in args.batch_size.split(","):
            results = {}
            for method in ("fast", "brute"):
                cmd = [sys.executable, __file__, "--model", str(model), "--worker", method, "--batch-size", batch]
                cmd += ["--samples", str(args.samples)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                results[method] = json.loads(out.strip().splitlines()[-1])
            fast, brute = results["fast"], results["brute"]
            scale = max(abs(v) for v in brute["lc"]) or 1.0
            diff = max(abs(a - b) for a, b in zip(fast["lc"], brute["lc"], strict=True)) / scale
            for name, r in (("prefix reuse", fast), ("brute force", brute)):
                gpu = f"{r['gpu_mib']:.0f}" if r["gpu_mib"] is not None else "-"
                print(
                    f"| {name} | {batch} | {r['seconds']:.2f} | {r['forwards']} | {r['peak_rss_mib']:.0f} | {gpu} | "
                    f"{diff:.1e} |"
                )
            print(
                f"| speed-up | {batch} | {brute['seconds'] / fast['seconds']:.2f}x | "
                f"{fast['forwards'] / brute['forwards']:.2f} | | | |"
            )


if __name__ == "__main__":
    main()
