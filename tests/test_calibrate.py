"""LC calibration (docs/method.md section 2): exactness against brute force, cost, determinism, data, end to end."""

from __future__ import annotations

import json
import shutil
from functools import cache

import pytest
import torch
from click.testing import CliRunner
from conftest import NEWEST_ONLY, also_lowest, image, processor_for, tiny_dir
from oracle import oracle_hooks

from shortv_export.calibrate import calibrate, load_base_model
from shortv_export.cli import main
from shortv_export.data import (
    CAPTION_PROMPT,
    FALLBACK_TEMPLATE,
    Sample,
    format_prompt,
    load_calibration,
    prompt_batch,
)
from shortv_export.errors import ShortVError
from shortv_export.load import resolve_model
from shortv_export.models import text_model, visual_token_ids
from shortv_export.numerics import kl
from shortv_export.select import PAPER_LAYERS
from shortv_export.tiny import FAMILIES, NEW_FAMILIES

LAYERS = 12


@cache
def model_and_processor(kind: str, dtype: str = "fp64", text: str = "llama"):
    source = resolve_model(str(tiny_dir(kind, LAYERS, text)))
    return load_base_model(source, device="cpu", dtype=dtype), processor_for(source.path)


def brute_force_lc(model, processor, samples, rows: str = "visual") -> tuple[list[float], int]:
    """One full forward of the stock model per sample and layer, the layer frozen by the oracle; no reuse."""
    image_token = model.config.image_token_id
    visual_ids = visual_token_ids(model.config)
    vocab = processor.tokenizer.get_vocab()
    frozen_ids = visual_ids if rows == "visual" else [i for i in vocab.values() if i not in visual_ids]
    forwards = [0]
    hooks = [
        layer.register_forward_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
        for layer in text_model(model).layers
    ]
    total = torch.zeros(LAYERS, dtype=torch.float64)
    with torch.no_grad():
        for s in samples:
            inputs = prompt_batch(processor, [s])
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            original = torch.log_softmax(model(**inputs).logits[:, -1].double(), -1)
            for layer in range(LAYERS):
                with oracle_hooks(model, [layer], image_token, frozen_ids=frozen_ids):
                    frozen = torch.log_softmax(model(**inputs).logits[:, -1].double(), -1)
                total[layer] += kl(frozen, original).sum()
    for h in hooks:
        h.remove()
    return (total / len(samples)).tolist(), forwards[0]


def close(a: list[float], b: list[float], rel: float = 1e-4) -> bool:
    """Equal within ``rel`` of each value, with an absolute floor of ``rel * 1e-3`` of the largest LC: an LC that
    close to 0 ranks among the lowest whatever its exact value."""
    floor = rel * 1e-3 * max(abs(y) for y in b)
    return all(abs(x - y) <= rel * abs(y) + floor for x, y in zip(a, b, strict=True))


LC_MODELS = [("llava", "llama"), ("llava_next", "llama"), ("llava", "mistral_sliding"), ("llava", "qwen2_sliding")]
LC_MODELS += [(kind, text) for kind, text in FAMILIES if kind in NEW_FAMILIES]
# on the lowest transformers too: one model per text-decoder kind (Llama, Mistral, Qwen2 with M-RoPE, Gemma 3) and
# LLaVA-NeXT's variable image-token counts
LC_LOWEST = {
    ("llava", "llama"),
    ("llava_next", "llama"),
    ("llava", "mistral_sliding"),
    ("qwen2_5_vl", "qwen2"),
    ("gemma3", "gemma3"),
}


@pytest.mark.parametrize(
    "kind,text", also_lowest(LC_MODELS, lambda c: c in LC_LOWEST, [f"{k}-{t}" for k, t in LC_MODELS])
)
def test_lc_equals_brute_force_and_costs_at_most_055(kind, text):
    model, processor = model_and_processor(kind, text=text)
    calib = load_calibration(None, samples=3, seed=1)  # brute force: (L + 1) x L forwards a sample
    lc = calibrate(model, processor, calib, modality="both", batch_size=2, progress=False)
    visual, brute_forwards = brute_force_lc(model, processor, calib.samples, "visual")
    text, _ = brute_force_lc(model, processor, calib.samples, "text")
    assert close(lc.visual, visual, 1e-7) and close(lc.text, text, 1e-7)  # fp64 throughout
    assert lc.order == sorted(range(LAYERS), key=lambda i: (visual[i], i))
    assert lc.order != list(range(LAYERS))  # a real ranking, not the identity

    # cost, sample by sample (batch 1) as brute force runs: decoder-layer forwards counted with hooks
    counted = [0]
    hooks = [
        layer.register_forward_hook(lambda *a: counted.__setitem__(0, counted[0] + 1))
        for layer in text_model(model).layers
    ]
    fast = calibrate(model, processor, calib, modality="visual", batch_size=1, progress=False)
    for h in hooks:
        h.remove()
    assert brute_forwards == len(calib.samples) * (LAYERS + 1) * LAYERS
    assert counted[0] == fast.calibration["layer_forwards"]
    assert counted[0] / brute_forwards <= 0.55
    assert close(fast.visual, visual, 1e-7)


def test_batching_changes_lc_by_less_than_1e4_relative():
    model, processor = model_and_processor("llava_next", "fp32")
    calib = load_calibration(None, samples=6, seed=3)
    one = calibrate(model, processor, calib, batch_size=1, progress=False)
    six = calibrate(model, processor, calib, batch_size=6, progress=False)
    assert close(six.visual, one.visual)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl", "gemma3"])
def test_the_last_layers_visual_lc_is_exactly_zero(kind):
    """docs/method.md section 2: the last prompt position is text, so freezing visual rows in the last layer leaves
    the next-token distribution exactly as it was (it always ranks first: the published lists start with it);
    freezing the text rows there does change it."""
    model, processor = model_and_processor(kind, "fp32")
    lc = calibrate(
        model, processor, load_calibration(None, samples=4, seed=2), modality="both", batch_size=2, progress=False
    )
    assert lc.visual[-1] == 0.0 and lc.order[0] == LAYERS - 1
    assert lc.text[-1] > 1e-6


def test_the_published_lists_start_with_the_last_layer():
    for repo, layers in PAPER_LAYERS.items():
        assert layers[0] == (39 if "13b" in repo else 31), repo


def test_every_prompt_stays_with_its_own_image(tmp_path):
    rows = []
    for i in range(12):
        image(20 + i, 20, i).save(tmp_path / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "prompt": f"prompt about image {i}"})
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for seed in range(4):
        calib = load_calibration(str(tmp_path / "set.jsonl"), samples=5, seed=seed)
        assert len(calib.samples) == 5
        for s in calib.samples:
            number = s.prompt.rsplit(" ", 1)[1]
            assert s.load_image().size == (20 + int(number), 20)  # the image the prompt was written for
    default = load_calibration(None)
    assert len(default.samples) == 40
    assert sum("single word or phrase" in s.prompt for s in default.samples) == 20
    assert sum(s.prompt == CAPTION_PROMPT for s in default.samples) == 20
    assert len({(str(s.image), s.prompt) for s in default.samples}) == 40
    assert load_calibration(None, samples=7, seed=5).samples == load_calibration(None, samples=7, seed=5).samples
    assert load_calibration(None, samples=7, seed=5).samples != load_calibration(None, samples=7, seed=6).samples


def test_image_folder_gets_the_caption_prompt(tmp_path):
    for i in range(3):
        image(30, 30, i).save(tmp_path / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    calib = load_calibration(str(tmp_path))
    assert [s.prompt for s in calib.samples] == [CAPTION_PROMPT] * 3


def test_prompt_without_chat_template_uses_the_llava_format():
    _, processor = model_and_processor("llava")
    assert format_prompt(processor, "hi").startswith("USER: <image>\nhi")

    class Bare:
        chat_template = None

    assert (
        format_prompt(Bare(), "what ?")
        == FALLBACK_TEMPLATE.format(prompt="what ?")
        == "USER: <image>\nwhat ? ASSISTANT:"
    )


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("missing", "not found"),
        ("unreadable", "cannot be read"),
        ("malformed", "not valid JSON"),
        ("wrong keys", "expected"),
        ("empty", "is empty"),
    ],
)
def test_bad_calibration_data_names_the_input(problem, expected, tmp_path):
    image(30, 30).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = {
        "missing": ['{"image": "gone.png", "prompt": "p"}'],
        "unreadable": ['{"image": "ok.png", "prompt": "p"}', '{"image": "broken.png", "prompt": "p"}'],
        "malformed": ['{"image": "ok.png", "prompt": "p"}', '{"image": "ok.png", '],
        "wrong keys": ['{"picture": "ok.png", "prompt": "p"}'],
        "empty": [],
    }[problem]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(ShortVError) as err:
        for s in load_calibration(str(path)).samples:
            s.load_image()
    assert expected in str(err.value)
    named = {
        "missing": "gone.png",
        "unreadable": "broken.png",
        "malformed": "set.jsonl:2",
        "wrong keys": "set.jsonl:1",
        "empty": "set.jsonl",
    }[problem]
    assert named in str(err.value)
    # through the CLI: exit code 2, one line, before any model is loaded
    result = CliRunner().invoke(
        main, [str(tiny_dir("llava", LAYERS)), "--n", "3", "--calib", str(path), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1 and named in result.stderr
    assert not (tmp_path / "out").exists()


def test_sample_origin_is_reported_for_a_missing_image():
    with pytest.raises(ShortVError, match="x.jsonl:4"):
        Sample("/nonexistent/a.png", "p", "x.jsonl:4").load_image()


@NEWEST_ONLY  # the CLI over the model file: once (README Versions)
def test_end_to_end_n3_writes_the_three_lowest_lc_layers_and_is_reproducible(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_dir("llava", LAYERS), base)
    args = [str(base), "--n", "3", "--samples", "12", "--seed", "0", "--modality", "both", "-q"]
    first = CliRunner().invoke(main, [*args, "--no-verify", "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    lc = json.loads((tmp_path / "a" / "lc.json").read_text())
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert lc["metric"] == "kl_last_token" and lc["samples"] == 12 and len(lc["visual"]) == LAYERS
    assert len(lc["text"]) == LAYERS
    assert lc["order"] == sorted(range(LAYERS), key=lambda i: (lc["visual"][i], i))
    assert config["shortv_layers"] == lc["order"][:3]
    assert lc["fidelity"]["layers"] == lc["order"][:3] and 0 <= lc["fidelity"]["top1_agreement"] <= 1
    assert (tmp_path / "a" / "lc.png").read_bytes()[:4] == b"\x89PNG"

    second = CliRunner().invoke(main, [*args, "--no-verify", "--out", str(tmp_path / "b")])
    assert second.exit_code == 0
    assert (tmp_path / "a" / "lc.json").read_bytes() == (tmp_path / "b" / "lc.json").read_bytes()

    # a re-run into the same folder reuses lc.json instead of recalibrating
    again = CliRunner().invoke(main, [*args[:-1], "--no-verify", "--out", str(tmp_path / "a"), "--overwrite"])
    assert again.exit_code == 0 and "reusing LC" in again.output and "calibrating LC on" not in again.output
    assert (tmp_path / "a" / "lc.json").read_bytes() == (tmp_path / "b" / "lc.json").read_bytes()

    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "a", trust_remote_code=True)
    assert loaded.config.shortv_layers == lc["order"][:3]


@NEWEST_ONLY
def test_target_flops_picks_the_smallest_n(tmp_path):
    from shortv_export.flops import flops_summary

    base = tiny_dir("llava", LAYERS)
    result = CliRunner().invoke(
        main, [str(base), "--target-flops", "0.9", "--samples", "8", "-q", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    lc = json.loads((tmp_path / "out" / "lc.json").read_text())
    layers = json.loads((tmp_path / "out" / "config.json").read_text())["shortv_layers"]
    text_config = resolve_model(str(base)).hf_config.text_config
    tokens = round(lc["calibration"]["n_visual_mean"]), round(lc["calibration"]["n_text_mean"])
    assert flops_summary(text_config, *tokens, layers)["ratio"] <= 0.9
    assert flops_summary(text_config, *tokens, layers[:-1])["ratio"] > 0.9


@pytest.mark.parametrize(
    "args, expected",
    [(["--n", "0"], "out of range"), (["--n", "13"], "out of range"), (["--n", "2", "--layers", "1"], "drop --n")],
)
def test_bad_n_exits_2(args, expected, tmp_path):
    result = CliRunner().invoke(main, [str(tiny_dir("llava", LAYERS)), *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_hf_dataset_calibration_keeps_prompts_with_images(tmp_path):
    """`--calib hf:NAME:split` through `datasets` (here a local imagefolder dataset; a Hub name works alike)."""
    pytest.importorskip("datasets")
    rows = []
    for i in range(4):
        image(20, 20 + i, i).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "question": f"question {i}"})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    calib = load_calibration(f"hf:{tmp_path}:train", prompt_column="question")
    assert [(s.prompt, s.load_image().size[1]) for s in calib.samples] == [(f"question {i}", 20 + i) for i in range(4)]
    with pytest.raises(ShortVError, match="no column 'prompt'"):
        load_calibration(f"hf:{tmp_path}:train", prompt_column="prompt")
