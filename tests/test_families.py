"""The families beyond LLaVA-1.5 / LLaVA-NeXT (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM), end to end:
the CLI calibrates, writes and verifies (a fresh process loads the folder with AutoModelForImageTextToText and
trust_remote_code, generates with and without the cache); the folder, loaded the same way here, equals the oracle
on a padded batch with several images; a dry run counts the FLOPs at the family's token counts. The model-level
exactness tests (eager/SDPA, padding, several images, generation) are test_modeling.py and test_generation.py,
and LC == brute force is test_calibrate.py, all over ``tiny.FAMILIES``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import batch, image, tiny_dir
from oracle import oracle_hooks
from transformers import AutoModelForImageTextToText

from shortv_export.cli import main
from shortv_export.load import load_processor
from shortv_export.models import SUPPORTED
from shortv_export.tiny import NEW_FAMILIES


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_cli_converts_verifies_and_the_folder_equals_the_oracle(kind, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(tiny_dir(kind)), "--n", "3", "--samples", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "verified:" in result.output and "generating with the cache matches without it" in result.output
    config = json.loads((out / "config.json").read_text())
    lc = json.loads((out / "lc.json").read_text())
    assert config["model_type"] == f"shortv_{kind}"
    assert config["shortv_layers"] == lc["order"][:3]
    family = SUPPORTED[kind]
    assert {"configuration_shortv.py", "modeling_shortv.py", family.modeling_file} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert family.modeling_file in card and f"- {kind}" in card

    layers = config["shortv_layers"]
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, attn_implementation="sdpa")
    assert type(model).__name__ == family.model_cls.__name__
    stock = AutoModelForImageTextToText.from_pretrained(tiny_dir(kind), attn_implementation="sdpa")
    rows = [
        ("how many shapes are there ?", [image(40, 50, 0), image(64, 32, 1)]),
        ("what is this ?", [image(30, 90, 2)]),
    ]
    inputs = batch(load_processor(out), rows, "left")
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ours = model.eval()(**inputs).logits
        with oracle_hooks(stock.eval(), layers, stock.config.image_token_id):
            ref = stock(**inputs).logits
        vanilla = stock(**inputs).logits
    assert (ours - ref)[keep].abs().max() <= 1e-5
    assert (ours - vanilla)[keep].abs().max() > 1e-3  # frozen layers really changed the model


@pytest.mark.parametrize("kind", ["qwen2_vl", "idefics3"])
def test_dry_run_counts_the_flops_at_the_family_token_counts(kind):
    result = CliRunner().invoke(main, [str(tiny_dir(kind)), "--dry-run", "--n", "3", "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "prefill FLOPs at" in result.output and "ratio" in result.output
    assert f"modeling_shortv_{'qwen2_vl' if kind == 'qwen2_vl' else 'idefics3'}.py" in result.output


def test_onnx_is_refused_at_once_for_families_it_does_not_export_yet(tmp_path):
    result = CliRunner().invoke(main, [str(tiny_dir("qwen2_vl")), "--n", "2", "--onnx", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "--onnx exports llava, llava_next checkpoints so far, not qwen2_vl" in result.output
    assert not (tmp_path / "x").exists()
