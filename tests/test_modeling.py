"""The ShortV model class against stock LLaVA and against the oracle (docs/method.md section 1)."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch
from conftest import batch, image, processor_for, tiny_dir
from oracle import oracle_hooks
from transformers import AutoModelForImageTextToText

from shortv_export.models import load_shortv
from shortv_export.tiny import FAMILIES

FROZEN = [4, 1, 3]  # of 6 layers; lowest LC first, so deliberately unsorted
MODELS = FAMILIES  # every text family, with and without a sliding window shorter than the prompts
model_params = pytest.mark.parametrize("kind,text", MODELS, ids=[f"{k}-{t}" for k, t in MODELS])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Q = "what is the color of the shape ?"
Q2 = "how many shapes are there in this picture ?"


def cases(kind: str) -> dict[str, tuple[list, str]]:
    """name -> (rows of (question, images), padding side). Rows differ in length and in visual-token count."""
    a, b, c = image(40, 50, 0), image(64, 32, 1), image(30, 90, 2)
    out = {
        "single": ([(Q, [a])], "left"),
        "left_padding": ([(Q, [a]), ("what is this ?", [b])], "left"),
        "right_padding": ([(Q, [a]), ("what is this ?", [b])], "right"),
        "several_images": ([(Q2, [a, b]), (Q, [c])], "left"),
        "image_and_text_only_rows": ([(Q, []), (Q2, [b])], "left"),
        "text_only": ([(Q, [])], "left"),
    }
    if kind != "llava":  # anyres / native resolution: the three images give three different visual-token counts
        out["different_image_sizes"] = ([(Q, [a]), (Q, [b]), (Q2, [c])], "right")
    return out


@cache
def processor(kind):
    return processor_for(tiny_dir(kind))  # the image-only processor where torchvision is missing


@cache
def pair(kind: str, attn: str = "sdpa", dtype: str = "fp32", layers: tuple = tuple(FROZEN), text: str = "llama"):
    """(ShortV model, stock model) from the same tiny checkpoint."""
    kw = dict(attn_implementation=attn, dtype=DTYPES[dtype])
    folder = tiny_dir(kind, text=text)
    shortv = load_shortv(folder, list(layers), **kw).eval()
    stock = AutoModelForImageTextToText.from_pretrained(folder, **kw).eval()
    return shortv, stock


def run(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def max_diff(a, b, keep):
    return (a.float() - b.float())[keep].abs().max().item()


@model_params
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_no_frozen_layers_equals_stock(kind, text, attn):
    shortv, stock = pair(kind, attn, layers=(), text=text)
    for name, (rows, side) in cases(kind).items():
        inputs = batch(processor(kind), rows, side)
        keep = inputs["attention_mask"].bool()
        assert max_diff(run(shortv, inputs).logits, run(stock, inputs).logits, keep) <= 1e-5, name


@model_params
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefill_logits_and_hidden_states_equal_oracle(kind, text, attn):
    shortv, stock = pair(kind, attn, text=text)
    image_token = shortv.config.image_token_id
    for name, (rows, side) in cases(kind).items():
        inputs = batch(processor(kind), rows, side)
        keep = inputs["attention_mask"].bool()
        ours = run(shortv, inputs, output_hidden_states=True)
        with oracle_hooks(stock, FROZEN, image_token):
            ref = run(stock, inputs, output_hidden_states=True)
        assert len(ours.hidden_states) == len(ref.hidden_states) == 7
        assert max_diff(ours.logits, ref.logits, keep) <= 1e-5, name
        for layer, (h, r) in enumerate(zip(ours.hidden_states, ref.hidden_states, strict=True)):
            assert max_diff(h, r, keep) <= 1e-5, f"{name}: hidden state {layer}"
        if (inputs["input_ids"] == image_token).any():  # ShortV really changed the model
            assert max_diff(ours.logits, run(stock, inputs).logits, keep) > 1e-3, name


@pytest.mark.parametrize(
    "kind,text",
    [("llava", "llama"), ("llava_next", "llama"), ("llava", "qwen2_sliding")]
    + [("qwen2_5_vl", "qwen2"), ("qwen3_vl", "qwen2"), ("gemma3", "gemma3"), ("smolvlm", "llama")],
)
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_close_to_oracle(kind, text, dtype):
    shortv, stock = pair(kind, "sdpa", dtype, text=text)
    rows, side = cases(kind)["several_images"]
    inputs = batch(processor(kind), rows, side)
    inputs["pixel_values"] = inputs["pixel_values"].to(DTYPES[dtype])
    keep = inputs["attention_mask"].bool()
    ours = run(shortv, inputs).logits
    with oracle_hooks(stock, FROZEN, shortv.config.image_token_id):
        ref = run(stock, inputs).logits
    baseline = max_diff(ref, run(stock, inputs).logits, keep)  # how far freezing moves the output
    diff = max_diff(ours, ref, keep)
    assert ours.dtype == DTYPES[dtype]
    assert diff <= 0.05 * baseline + 0.02, (diff, baseline)


@model_params
def test_padded_batch_equals_rows_one_by_one(kind, text):
    shortv, _ = pair(kind, "sdpa", text=text)
    rows, _ = cases(kind)["several_images"]
    for side in ("left", "right"):
        inputs = batch(processor(kind), rows, side)
        logits = run(shortv, inputs).logits
        for i, row in enumerate(rows):
            alone = batch(processor(kind), [row], side)
            n = alone["input_ids"].shape[1]
            mine = logits[i, -n:] if side == "left" else logits[i, :n]
            assert (mine - run(shortv, alone).logits[0]).abs().max() <= 1e-5, (side, i)


@model_params
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_greedy_generate_equals_oracle_and_uncached(kind, text, cache_implementation):
    shortv, stock = pair(kind, "sdpa", text=text)
    rows, side = cases(kind)["several_images"]
    inputs = batch(processor(kind), rows, side)
    # random weights may pick <image>, which an uncached step would then take for a placeholder
    common = dict(max_new_tokens=12, do_sample=False, suppress_tokens=[shortv.config.image_token_id])
    gen = dict(common, cache_implementation=cache_implementation)
    with torch.no_grad():
        ours = shortv.generate(**inputs, **gen)
        uncached = shortv.generate(**inputs, **common, use_cache=False)
        with oracle_hooks(stock, FROZEN, shortv.config.image_token_id):
            ref = stock.generate(**inputs, **gen)
        plain = stock.generate(**inputs, **gen)
    assert torch.equal(ours, ref)
    assert torch.equal(ours, uncached)  # the cache holds every frozen layer's K/V
    assert ours.shape[1] == inputs["input_ids"].shape[1] + 12
    if not (kind == "llava_next" and text.endswith("sliding")):  # there the last text rows barely see the image
        assert not torch.equal(ours, plain)  # the frozen layers changed what the model says


def test_sampling_generate_equals_oracle():
    shortv, stock = pair("llava", "sdpa")
    inputs = batch(processor("llava"), cases("llava")["left_padding"][0], "left")
    gen = dict(max_new_tokens=10, do_sample=True, top_k=0, temperature=1.0)
    with torch.no_grad():
        torch.manual_seed(7)
        ours = shortv.generate(**inputs, **gen)
        with oracle_hooks(stock, FROZEN, shortv.config.image_token_id):
            torch.manual_seed(7)
            ref = stock.generate(**inputs, **gen)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("kind,text", [("llava", "llama"), ("llava_next", "llama"), ("llava", "qwen2_sliding")])
def test_frozen_layer_projects_only_text_rows(kind, text):
    """Q, O and the MLP of a frozen layer see only text rows; K and V see every row."""
    shortv, _ = pair(kind, "sdpa", text=text)
    rows, side = cases(kind)["several_images"]
    inputs = batch(processor(kind), rows, side)
    visual = inputs["input_ids"] == shortv.config.image_token_id
    n_text_max = int((~visual).sum(1).max())
    seen: dict[tuple[int, str], int] = {}  # (layer, module) -> rows per batch entry it was given
    handles = []
    for i, layer in enumerate(shortv.model.language_model.layers):
        modules = {name: getattr(layer.self_attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        for name, mod in {**modules, "mlp": layer.mlp}.items():
            count = lambda m, a, o, k=(i, name): seen.__setitem__(k, a[0].shape[1])
            handles.append(mod.register_forward_hook(count))
    run(shortv, inputs)
    for h in handles:
        h.remove()
    seq = inputs["input_ids"].shape[1]
    assert n_text_max < seq  # every row has visual tokens to skip
    for i in range(len(shortv.model.language_model.layers)):
        frozen = i in FROZEN
        for name in ("q_proj", "o_proj", "mlp"):
            assert seen[(i, name)] == (n_text_max if frozen else seq), (i, name)
        assert seen[(i, "k_proj")] == seen[(i, "v_proj")] == seq


def test_unsupported_attention_backend_falls_back_exactly_with_warning(caplog):
    """A backend that takes no per-query mask runs the dense layer and resets visual rows (with a warning)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("test_custom", sdpa_attention_forward)
    shortv, _ = pair("llava", "test_custom")
    _, stock = pair("llava", "sdpa")
    inputs = batch(processor("llava"), cases("llava")["single"][0], "left")
    with caplog.at_level("WARNING"):
        ours = run(shortv, inputs).logits
    assert "fall back" in caplog.text
    with oracle_hooks(stock, FROZEN, shortv.config.image_token_id):
        ref = run(stock, inputs).logits
    assert (ours - ref).abs().max() <= 1e-5


def test_device_map_auto_loads_and_matches(tmp_path):
    """device_map="auto" with too little memory offloads layers; accelerate's hooks carry ShortV's inputs."""
    pytest.importorskip("accelerate")
    shortv, _ = pair("llava", "sdpa")
    mapped = load_shortv(
        tiny_dir("llava"), FROZEN, device_map="auto", max_memory={"cpu": "150KB"}, offload_folder=str(tmp_path)
    ).eval()
    inputs = batch(processor("llava"), cases("llava")["left_padding"][0], "left")
    assert hasattr(mapped, "hf_device_map")
    assert (run(mapped, inputs).logits - run(shortv, inputs).logits).abs().max() <= 1e-5


def test_an_untested_transformers_version_gets_one_clear_warning(caplog):
    """A checkpoint records the transformers range its model code was tested with; outside it, one warning."""
    import transformers

    from shortv_export.models import SUPPORTED, shortv_config_dict

    base = json.loads((tiny_dir("llava") / "config.json").read_text())
    config_dict = shortv_config_dict(base, FROZEN)
    config_cls, model_cls = SUPPORTED["llava"].config_cls, SUPPORTED["llava"].model_cls
    inside = config_cls.from_dict(config_dict)
    outside = config_cls.from_dict(dict(config_dict, shortv_transformers={"tested": ["4.0.0", "4.1.0"]}))
    with caplog.at_level("WARNING"):
        model_cls(inside)
        assert "tested with transformers" not in caplog.text
        model_cls(outside)
        model_cls(outside)
    assert caplog.text.count("tested with transformers 4.0.0 to 4.1.0") == 1
    assert f"you are running {transformers.__version__}" in caplog.text


def test_declared_transformers_range_starts_where_ci_tests():
    """pyproject's lower bound is the version CI installs for its second run (compat.TESTED_TRANSFORMERS[0])."""
    import re
    from pathlib import Path

    from shortv_export.compat import TESTED_TRANSFORMERS, version_key

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    lowest = re.search(r'"transformers>=([\d.]+)', pyproject).group(1)
    assert version_key(lowest) == version_key(TESTED_TRANSFORMERS[0])[: len(version_key(lowest))]
