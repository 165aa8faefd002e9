"""Worst differences between the ShortV classes and the oracle, per model family, as a table.

    python scripts/parity_table.py            # every (family, text model) of the tiny fixtures

For each family: max |logits| difference of a padded prefill batch (two rows, three images) against the oracle
(the stock model with the frozen layers' visual rows reset to their input, tests/oracle.py), for SDPA and
eager in fp32 and SDPA in bf16 (with the bf16 oracle's own distance to fp32 for scale); and whether greedy
generation (12 tokens, dynamic and static cache) gives the oracle's tokens and the uncached tokens.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import batch, processor_for  # noqa: E402
from oracle import oracle_hooks  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

from shortv_export.models import load_shortv, visual_token_ids  # noqa: E402
from shortv_export.tiny import FAMILIES, save_tiny  # noqa: E402

FROZEN = [4, 1, 3]


def picture(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def inputs_for(processor):
    rows = [
        ("how many shapes are there in this picture ?", [picture(40, 50, 0), picture(64, 32, 1)]),
        ("what is the color of the shape ?", [picture(30, 90, 2)]),
    ]
    return batch(processor, rows, "left")


@torch.no_grad()
def measure(folder: Path) -> dict:
    processor = processor_for(folder)
    inputs = inputs_for(processor)
    keep = inputs["attention_mask"].bool()
    row = {}
    for attn, dtype in (("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.bfloat16)):
        shortv = load_shortv(folder, FROZEN, attn_implementation=attn, dtype=dtype).eval()
        stock = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation=attn, dtype=dtype).eval()
        cast = dict(inputs, pixel_values=inputs["pixel_values"].to(dtype))
        ours = shortv(**cast).logits.float()
        with oracle_hooks(stock, FROZEN, shortv.config.image_token_id):
            ref = stock(**cast).logits.float()
        row[f"{attn}-{str(dtype)[6:]}"] = float((ours - ref)[keep].abs().max())
        if dtype == torch.bfloat16:
            row["bf16 oracle vs fp32 oracle"] = float((ref - row.pop("_fp32_ref"))[keep].abs().max())
        elif attn == "sdpa":
            row["_fp32_ref"] = ref
            gen = dict(max_new_tokens=12, do_sample=False, suppress_tokens=visual_token_ids(shortv.config))
            same = []
            for cache in ("dynamic", "static"):
                tokens = shortv.generate(**inputs, **gen, cache_implementation=cache)
                with oracle_hooks(stock, FROZEN, shortv.config.image_token_id):
                    oracle_tokens = stock.generate(**inputs, **gen, cache_implementation=cache)
                uncached = shortv.generate(**inputs, **gen, use_cache=False)
                same.append(torch.equal(tokens, oracle_tokens) and torch.equal(tokens, uncached))
            row["generate == oracle == uncached"] = "yes" if all(same) else "NO"
    return row


def main():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in flags]
    print(f"# transformers {transformers.__version__}, torch {torch.__version__}, {platform.machine()}")
    print(f"# CPU flags: {' '.join(cpu) or 'unknown'}; frozen layers {FROZEN} of 6; max |logits diff| vs oracle")
    print()
    header = None
    with tempfile.TemporaryDirectory() as tmp:
        for kind, text in FAMILIES:
            folder = save_tiny(Path(tmp) / f"{kind}-{text}", kind, text=text)
            row = measure(folder)
            if header is None:
                header = list(row)
                print("| family | " + " | ".join(header) + " |")
                print("|---" * (len(header) + 1) + "|")
            cells = [f"{row[k]:.1e}" if isinstance(row[k], float) else row[k] for k in header]
            print(f"| {kind} + {text} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
