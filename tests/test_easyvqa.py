"""The trained tiny LLaVA (examples/tiny-llava-easyvqa) through the whole product: LC calibration on easy-VQA
train questions, conversion, loading with transformers alone, and accuracy on 200 easy-VQA test questions."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shortv_export.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-llava-easyvqa"
sys.path.insert(0, str(ROOT / "scripts"))

pytest.importorskip("easy_vqa", reason="pip install easy-vqa (part of the dev extra)")
from eval_easyvqa import freeze_rows  # noqa: E402
from train_tiny_llava import Encoded, accuracy, easy_vqa_split  # noqa: E402

# From the full run in docs/results.md (9,673 test questions): vanilla 85.7%, ShortV N=7 (LC on 40 easy-VQA
# train samples) 84.7%, 12 of 12 layers frozen 80.3%, text tokens frozen instead 14.3%. The thresholds leave
# room for the sampling error of 200 questions (sd about 2.5 points); on the same 200 questions (88.0% and 85.5%
# here) ShortV stays within MAX_DROP of vanilla, while freezing the text tokens of the same layers collapses it.
# (The fixture's metrics.json records what training reached; what is asserted is measured here.)
VANILLA_MIN = 0.78
SHORTV_MIN = 0.77
MAX_DROP = 0.05
TEXT_FROZEN_MAX = 0.4


def _questions(n: int = 200) -> list[int]:
    rows = list(range(len(easy_vqa_split("test")[0])))
    random.Random(0).shuffle(rows)
    return sorted(rows[:n])


def test_trained_fixture_keeps_its_accuracy_with_shortv(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    questions, _, paths = easy_vqa_split("train")
    calib = tmp_path / "easyvqa.jsonl"
    lines = [json.dumps({"image": p, "prompt": q}) for q, p in zip(questions, paths, strict=True)]
    calib.write_text("\n".join(lines) + "\n")
    out = tmp_path / "shortv"
    args = [str(EXAMPLE), "--n", "7", "--calib", str(calib), "--samples", "40", "--out", str(out), "-q", "--no-verify"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "config.json").read_text())["shortv_layers"]
    assert sorted(layers) == [0, 1, 2, 5, 6, 10, 11]  # the LC choice of scripts/eval_easyvqa.py (same 40 samples)

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    test = Encoded(processor, *easy_vqa_split("test"))
    rows = _questions()
    shortv = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    vanilla = AutoModelForImageTextToText.from_pretrained(EXAMPLE, dtype=torch.float32).eval()
    assert type(shortv).__name__ == "ShortVLlavaForConditionalGeneration"
    vanilla_accuracy = accuracy(vanilla, test, rows, processor)
    shortv_accuracy = accuracy(shortv, test, rows, processor)
    with freeze_rows(vanilla, layers, "text", vanilla.config.image_token_id):  # the paper's contrast
        text_frozen_accuracy = accuracy(vanilla, test, rows, processor)
    assert vanilla_accuracy >= VANILLA_MIN
    assert shortv_accuracy >= SHORTV_MIN and shortv_accuracy >= vanilla_accuracy - MAX_DROP
    assert text_frozen_accuracy <= TEXT_FROZEN_MAX
