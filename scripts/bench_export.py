"""Peak memory and time of `--onnx` at LLaVA-1.5-7B layer shapes (random weights, reduced depth).

    python scripts/bench_export.py --depth 4 --dtype fp16        # 4 layers of 4096/11008, 32064 vocab

Builds a bf16 safetensors checkpoint of the shape (with the tiny word-level processor: the token ids it makes
are valid for any vocabulary), then runs `shortv-export CKPT --layers ... --onnx --onnx-dtype DTYPE` in a child
process under /usr/bin/time and prints: the exported weights' bytes, the child's peak RSS and their ratio,
and the wall time of each stage from the command's own output. The extrapolation to full depth: exported
weights grow by one layer's bytes per layer; the peak RSS of the export is about the weights plus a fixed
overhead (see docs/results.md).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoint(folder: Path, depth: int) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from shortv_export.tiny import build_tiny

    _, processor = build_tiny("llava")
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=depth,
        vocab_size=32064,
        max_position_embeddings=4096,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_layer=-2,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dtype", default="fp16", choices=["fp32", "fp16"])
    parser.add_argument("--keep", type=Path, help="build the checkpoint here and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.keep or Path(tmp) / "ckpt"
        if not (ckpt / "config.json").exists():
            start = time.perf_counter()
            build_checkpoint(ckpt, args.depth)
            print(f"# built {ckpt} in {time.perf_counter() - start:.0f} s")
        out = Path(tmp) / "out"
        layers = ",".join(str(i) for i in range(args.depth - 1, args.depth // 2 - 1, -1))
        command = [
            "shortv-export",
            str(ckpt),
            "--layers",
            layers,
            "--onnx",
            "--onnx-dtype",
            args.dtype,
            "--out",
            str(out),
        ]
        start = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-v", *command, "--no-verify"], capture_output=True, text=True, env=None
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
        onnx_dir = out / "onnx"
        weights = sum(p.stat().st_size for p in onnx_dir.iterdir() if p.suffix != ".json")
        source = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
        print(f"# {args.depth} layers of 4096/11008, vocab 32064, frozen {layers}; torch {torch.__version__}")
        print("| ONNX dtype | checkpoint (bf16) GB | exported GB | peak RSS GB | RSS / exported | wall s |")
        print("|---|---|---|---|---|---|")
        print(
            f"| {args.dtype} | {source / 1e9:.2f} | {weights / 1e9:.2f} | {rss / 1e9:.2f} | {rss / weights:.2f} | "
            f"{wall:.0f} |"
        )
        for line in proc.stdout.splitlines():
            if "ONNX Runtime vs PyTorch" in line:
                print(f"# {line}")


if __name__ == "__main__":
    main()
