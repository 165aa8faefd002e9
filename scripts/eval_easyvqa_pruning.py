"""Paper Table 5 in miniature: easy-VQA test accuracy of the trained tiny LLaVA, vanilla vs FastV vs ShortV vs
ShortV + FastV, with each configuration's prefill FLOPs ratio (docs/method.md section 5).

    pip install easy-vqa
    python scripts/eval_easyvqa_pruning.py examples/tiny-llava-easyvqa [--limit 2000] [--fastv 2:0.5]

ShortV's layers: the round(0.6 L) lowest-LC layers, LC calibrated on 40 easy-VQA train samples (as
scripts/eval_easyvqa.py). One model, whose frozen layers and pruning are switched per configuration; greedy exact
match on the first --limit test questions (seeded shuffle). FLOPs at the test prompts' mean token counts.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from eval_easyvqa import easyvqa_calibration, switchable  # noqa: E402
from train_tiny_llava import Encoded, accuracy, easy_vqa_split  # noqa: E402

from shortv_export.calibrate import calibrate  # noqa: E402
from shortv_export.flops import flops_summary  # noqa: E402
from shortv_export.models import load_shortv  # noqa: E402
from shortv_export.pipeline import parse_prune, prune_description  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--fastv", default="2:0.5", help="K:R")
    args = parser.parse_args(argv)
    from transformers import AutoProcessor

    fastv = parse_prune(args.fastv, None)
    processor = AutoProcessor.from_pretrained(args.model)
    test = Encoded(processor, *easy_vqa_split("test"))
    rows = list(range(len(test)))
    random.Random(0).shuffle(rows)
    rows = sorted(rows[: args.limit])
    model = load_shortv(args.model, [], fastv, attn_implementation="sdpa").eval()
    switchable(model)
    model.model.shortv_prune = None
    layers = len(model.model.language_model.layers)
    with tempfile.TemporaryDirectory() as tmp:
        calib = easyvqa_calibration(40, Path(tmp))
        model.model.shortv_layers = []
        frozen = calibrate(model, processor, calib, batch_size=8, progress=False).order[: round(0.6 * layers)]
    ids, mask, _ = test.prompt_batch(rows[:256])
    n_visual = float((ids == model.config.image_token_id).sum(1).float().mean())
    n_text = float(mask.sum(1).float().mean()) - n_visual
    arms = {"vanilla": ([], None), prune_description(fastv): ([], fastv), "ShortV": (frozen, None)}
    arms[f"ShortV + {prune_description(fastv)}"] = (frozen, fastv)
    text_config = model.config.text_config
    print(f"# {args.model}: {layers} layers; {len(rows)} easy-VQA test questions; greedy exact match")
    print(f"ShortV layers (LC, 40 easy-VQA train samples): {sorted(frozen)}; tokens {n_visual:.0f} + {n_text:.1f}\n")
    print("| configuration | prefill FLOPs ratio | accuracy |")
    print("|---|---|---|")
    for name, (frozen_layers, prune) in arms.items():
        model.model.shortv_layers, model.model.shortv_prune = list(frozen_layers), prune
        ratio = flops_summary(text_config, round(n_visual), round(n_text), frozen_layers, prune)["ratio"]
        print(f"| {name} | {ratio:.1%} | {accuracy(model, test, rows, processor):.2%} |")


if __name__ == "__main__":
    main()
