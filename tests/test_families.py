"""The families beyond LLaVA-1.5 / LLaVA-NeXT (``tiny.NEW_FAMILIES``), end to end: the CLI calibrates, writes and
verifies (a fresh process loads the folder with AutoModelForImageTextToText and trust_remote_code, generates with
and without the cache); the folder, loaded the same way here, equals the oracle on a padded batch with several
images; videos (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) freeze like images and equal the oracle,
generation included; a dry run counts the FLOPs at the family's token counts. Without torchvision (these
machines), processors load as ``load.load_processor`` builds them: the family's class without its video
processor, or for Mistral 3 ``load.pixtral_processor_class``. The model-level exactness tests (eager/SDPA,
padding, several images, generation) are test_modeling.py and test_generation.py, and LC == brute force is
test_calibrate.py, all over ``tiny.FAMILIES``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import batch, image, processor_for, prompt, tiny_dir
from oracle import oracle_hooks
from transformers import AutoModelForImageTextToText

from shortv_export.cli import main
from shortv_export.families import FAMILIES
from shortv_export.load import load_processor
from shortv_export.models import SUPPORTED, load_shortv
from shortv_export.tiny import NEW_FAMILIES


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_cli_converts_verifies_and_the_folder_equals_the_oracle(kind, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(tiny_dir(kind)), "--n", "3", "--samples", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "verified:" in result.output and "generating with the cache matches without it" in result.output
    lc = json.loads((out / "lc.json").read_text())
    check_folder(kind, out, lc["order"][:3])


def check_folder(kind: str, out, layers: list[int]) -> None:
    """The written folder: config, model files, card; loaded with the auto class and remote code, it equals the
    oracle on a padded batch of two prompts with three images."""
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"shortv_{kind}"
    assert config["shortv_layers"] == layers
    family = SUPPORTED[kind]
    assert {"configuration_shortv.py", "modeling_shortv.py", family.modeling_file} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert family.modeling_file in card and f"- {kind}" in card
    assert ("`pip install torchvision` before `AutoProcessor" in card) == FAMILIES[kind].torchvision

    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, attn_implementation="sdpa")
    assert type(model).__name__ == family.model_cls.__name__
    stock = AutoModelForImageTextToText.from_pretrained(tiny_dir(kind), attn_implementation="sdpa")
    rows = [
        ("how many shapes are there ?", [image(40, 50, 0), image(64, 32, 1)]),
        ("what is this ?", [image(30, 90, 2)]),
    ]
    inputs = batch(processor_for(out), rows, "left")
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ours = model.eval()(**inputs).logits
        with oracle_hooks(stock.eval(), layers, stock.config.image_token_id):
            ref = stock(**inputs).logits
        vanilla = stock(**inputs).logits
    assert (ours - ref)[keep].abs().max() <= 1e-5
    assert (ours - vanilla)[keep].abs().max() > 1e-3  # frozen layers really changed the model


def video_batch(processor, config, kind: str) -> dict:
    """Row 0: a video (random frames, built by hand: the video processors need torchvision) and a question; row 1:
    an image and a question; left-padded, in the family's own token layout."""
    torch.manual_seed(0)
    if kind == "llava_onevision":
        frames = 2
        video = {"pixel_values_videos": torch.randn(1, frames, 3, 28, 28)}
        n, spans = frames * 4 + 1, 1  # 2x2 pooled patches per frame, then one newline feature
    else:
        t, h, w = 2, 4, 4
        v = config.vision_config
        patches = torch.randn(t * h * w, 3 * v.temporal_patch_size * v.patch_size**2)
        video = {"pixel_values_videos": patches, "video_grid_thw": torch.tensor([[t, h, w]])}
        n = t * h * w // v.spatial_merge_size**2
        spans = t if kind == "qwen3_vl" else 1  # Qwen3-VL: one span per frame (timestamps between, in real use)
    token = processor.tokenizer.convert_ids_to_tokens(config.video_token_id)
    content = [{"type": "video"}, {"type": "text", "text": "what is the color of the shape ?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    text = text.replace(token, "<|vision_end|><|vision_start|>".join([token * (n // spans)] * spans))
    first = processor.tokenizer(text, return_tensors="pt")["input_ids"][0]
    second = dict(processor(images=[image(30, 90, 2)], text=[prompt(processor, "what ?", 1)], return_tensors="pt"))
    rows = (first, second.pop("input_ids")[0])
    width = max(len(r) for r in rows)
    pad = processor.tokenizer.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([(torch.arange(width) >= width - len(r)).long() for r in rows])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": video.pop("pixel_values_videos")}
    inputs.update(video, **{k: v for k, v in second.items() if k not in ("attention_mask", "mm_token_type_ids")})
    if "mm_token_type_ids" in second:
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
    return inputs


@pytest.mark.parametrize("kind", ["llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_video_rows_freeze_like_image_rows_and_equal_the_oracle(kind):
    folder = tiny_dir(kind)
    shortv = load_shortv(folder, [4, 1, 3], attn_implementation="sdpa").eval()
    stock = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="sdpa").eval()
    inputs = video_batch(load_processor(folder), shortv.config, kind)
    assert (inputs["input_ids"][0] == shortv.config.video_token_id).sum() >= 8
    keep = inputs["attention_mask"].bool()
    gen = dict(
        max_new_tokens=6, do_sample=False, suppress_tokens=[shortv.config.image_token_id, shortv.config.video_token_id]
    )
    with torch.no_grad():
        ours = shortv(**inputs).logits
        tokens = shortv.generate(**inputs, **gen)
        with oracle_hooks(stock, [4, 1, 3], stock.config.image_token_id):  # image and video rows frozen
            ref = stock(**inputs).logits
            ref_tokens = stock.generate(**inputs, **gen)
        with oracle_hooks(stock, [4, 1, 3], stock.config.image_token_id, [stock.config.image_token_id]):
            images_only = stock(**inputs).logits
    assert (ours - ref)[keep].abs().max() <= 1e-5
    assert torch.equal(tokens, ref_tokens)
    assert (ours - images_only)[keep].abs().max() > 1e-3  # the video rows really were frozen


@pytest.mark.parametrize("kind", ["qwen2_vl", "idefics3"])
def test_dry_run_counts_the_flops_at_the_family_token_counts(kind):
    result = CliRunner().invoke(main, [str(tiny_dir(kind)), "--dry-run", "--n", "3", "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "prefill FLOPs at" in result.output and "ratio" in result.output
    assert f"modeling_shortv_{'qwen2_vl' if kind == 'qwen2_vl' else 'idefics3'}.py" in result.output


def test_onnx_is_refused_at_once_for_families_it_does_not_export_yet(tmp_path):
    result = CliRunner().invoke(main, [str(tiny_dir("gemma3")), "--n", "2", "--onnx", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert (
        "--onnx exports llava, llava_next, qwen2_vl, qwen2_5_vl, idefics3, smolvlm checkpoints so far, not gemma3"
        in result.output
    )
    assert not (tmp_path / "x").exists()
