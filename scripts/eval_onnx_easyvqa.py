"""The trained tiny LLaVA's ONNX exports, fp32 / fp16 / int8 / int4 decoder: size, agreement with the
unquantized graph, decode speed (with and without IO binding) and easy-VQA test accuracy, as one table.

    pip install easy-vqa
    python scripts/eval_onnx_easyvqa.py examples/tiny-llava-easyvqa [--limit 1000] [--layers 11,10,6,1,2,0,5]

Each variant is a fresh `shortv_export.convert(..., onnx=True)`; accuracy is greedy exact match through
`ShortVOnnxModel` (as scripts/train_tiny_llava.py scores PyTorch), speed is prefill + 32 greedy tokens for a
batch of 8 test prompts (median of 3, tokens/s counts new tokens).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from train_tiny_llava import Encoded, accuracy, easy_vqa_split  # noqa: E402

from shortv_export import CalibrationOptions, convert  # noqa: E402
from shortv_export.onnx_runtime import ShortVOnnxModel  # noqa: E402

VARIANTS = {"fp32": ("fp32", None), "fp16": ("fp16", None), "int8": ("fp32", "int8"), "int4": ("fp32", "int4")}


class _Runner:
    """ShortVOnnxModel with the two things train_tiny_llava.accuracy calls on a model."""

    def __init__(self, runner):
        self.runner = runner

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, pixel_values, max_new_tokens, do_sample=False):
        import torch

        ids = self.runner.generate(
            input_ids.numpy(), attention_mask.numpy(), pixel_values.numpy(), max_new_tokens=max_new_tokens
        )
        return torch.from_numpy(ids)


def tokens_per_second(runner, data: Encoded, rows, new_tokens: int = 32) -> float:
    ids, mask, pixels = data.prompt_batch(rows)
    arrays = (ids.numpy(), mask.numpy(), pixels.numpy())
    times = []
    for _ in range(4):
        start = time.perf_counter()
        runner.generate(*arrays, max_new_tokens=new_tokens, eos_token_id=[])
        times.append(time.perf_counter() - start)
    return len(rows) * new_tokens / statistics.median(times[1:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--layers", default="11,10,6,1,2,0,5", help="frozen layers [the LC choice on easy-VQA]")
    parser.add_argument("--limit", type=int, default=1000, help="test questions (seeded choice)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    test = Encoded(processor, *easy_vqa_split("test"))
    rows = list(range(len(test)))
    random.Random(0).shuffle(rows)
    rows = sorted(rows[: args.limit])
    speed_rows = rows[:8]
    print(f"# {args.model}, frozen layers {args.layers}; {len(rows)} easy-VQA test questions; {platform.machine()}")
    print("| decoder | decoder MiB | top-1 vs unquantized | accuracy | tok/s (IO binding) | tok/s (numpy cache) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            dtype, scheme = VARIANTS[name]
            result = convert(
                str(args.model),
                layers=args.layers,
                out=Path(tmp) / name,
                onnx=True,
                onnx_dtype=dtype,
                onnx_quantize=scheme,
                verify=False,
                progress=False,
                calibration=CalibrationOptions(min_agreement=0.0),
            )
            onnx_dir = result.out / "onnx"
            size = sum(p.stat().st_size for p in onnx_dir.glob("decoder_model_merged.onnx*")) / 2**20
            q = result.onnx_quantization
            agreement = f"{q['top1_agreement_vs_unquantized']:.1%}" if q else "-"
            bound, plain = (ShortVOnnxModel.from_pretrained(onnx_dir, io_binding=b) for b in (True, False))
            acc = accuracy(_Runner(bound), test, rows, processor)
            fast, slow = tokens_per_second(bound, test, speed_rows), tokens_per_second(plain, test, speed_rows)
            print(f"| {name} | {size:.2f} | {agreement} | {acc:.2%} | {fast:.0f} | {slow:.0f} |", flush=True)


if __name__ == "__main__":
    main()
