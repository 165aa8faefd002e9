"""Token pruning (FastV, VTW) alone and with ShortV layers, against the independent oracle (tests/oracle.py: the
stock model, eager, one unpadded row at a time, FastV ranked from its eager attention map, removed tokens masked
out of the later layers): prefill logits of padded batches, cached and uncached greedy generation, the KV cache
holding only the kept tokens, and what is refused."""

from __future__ import annotations

import json
import re
from functools import cache

import pytest
import torch
from conftest import NEWEST_ONLY, batch, image, processor_for, tiny_dir
from oracle import oracle_generate, oracle_hooks, pruning_oracle_hooks
from transformers import AutoModelForImageTextToText, DynamicCache

from shortv_export.compat import cache_kwarg
from shortv_export.models import load_shortv, visual_token_ids

FASTV = {"method": "fastv", "layer": 2, "ratio": 0.5}
VTW = {"method": "vtw", "layer": 3}
CONFIGS = {  # name -> (ShortV layers, pruning): layer 1 before the pruned layers, 3 and 4 among them
    "fastv": ((), FASTV),
    "vtw": ((), VTW),
    "shortv_fastv": ((4, 1, 3), FASTV),
    "shortv_vtw": ((4, 1), VTW),
}
# every family whose text model attends in full (Gemma 3 and the sliding-window variants are refused)
MODELS = [("llava", "llama"), ("llava_next", "llama"), ("llava", "mistral"), ("llava", "qwen2")]
MODELS += [(k, None) for k in ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm")]
MODELS += [("mistral3", None)]
# every family with ShortV + FastV (the combination, which runs every code path) and VTW; each configuration on
# LLaVA (1-D RoPE) and Qwen2.5-VL (M-RoPE)
CASES = [(k, t, c) for k, t in MODELS for c in ("shortv_fastv", "vtw")]
CASES += [(k, t, c) for k, t in (("llava", "llama"), ("qwen2_5_vl", None)) for c in ("fastv", "shortv_vtw")]


def params(cases):
    names = "kind,text,config" + (",padding_side" if len(cases[0]) == 4 else "")
    return pytest.mark.parametrize(names, cases, ids=["-".join(str(v or "") for v in c) for c in cases])


Q, Q2 = "what is the color of the shape ?", "how many shapes are there in this picture ?"


def folder(kind, text):
    return tiny_dir(kind, text=text) if text else tiny_dir(kind)


@cache
def models(kind, text, config, attn="sdpa", dtype=torch.float32):
    layers, prune = CONFIGS[config]
    ours = load_shortv(folder(kind, text), list(layers), prune, attn_implementation=attn, dtype=dtype).eval()
    stock = AutoModelForImageTextToText.from_pretrained(folder(kind, text), attn_implementation="eager", dtype=dtype)
    return ours, stock.eval()


def rows():
    """Three rows: two images, one, none (different visual-token counts, lengths, and a row with nothing to
    prune)."""
    return [(Q2, [image(40, 50, 0), image(64, 32, 1)]), (Q, [image(30, 90, 2)]), ("hello there , who are you ?", [])]


def oracle(kind, text, config, rank_position=None):
    """The stock model and the oracle's hooks on it for ``config``."""
    layers, prune = CONFIGS[config]
    _, stock = models(kind, text, config)
    ids = visual_token_ids(stock.config)
    hooks = [pruning_oracle_hooks(stock, prune, ids, rank_position), oracle_hooks(stock, list(layers), ids[0], ids)]
    return stock, hooks


def inputs_of(kind, text, selected, padding_side="left"):
    return batch(processor_for(folder(kind, text)), selected, padding_side)


def last_logits_of_oracle(kind, text, config, row_inputs):
    stock, hooks = oracle(kind, text, config)
    with torch.no_grad(), hooks[0], hooks[1]:
        return stock(**row_inputs, use_cache=False).logits[0, -1]


@params(
    [(*case, "left") for case in CASES]
    + [(k, t, "shortv_fastv", "right") for k, t in (("llava", "llama"), ("llava_next", "llama"), ("qwen2_5_vl", None))]
)
def test_prefill_of_a_padded_batch_equals_the_oracle_row_by_row(kind, text, config, padding_side):
    ours, _ = models(kind, text, config)
    inputs = inputs_of(kind, text, rows(), padding_side)
    with torch.no_grad():
        logits = ours(**inputs).logits
    last = inputs["attention_mask"].cumsum(1).argmax(1)  # each row's last real token
    for i in range(len(rows())):
        expected = last_logits_of_oracle(kind, text, config, inputs_of(kind, text, rows()[i : i + 1]))
        torch.testing.assert_close(logits[i, last[i]], expected, atol=2e-5, rtol=1e-4)


@params([c for c in CASES if c[2] != "vtw" or c[0] in ("llava", "qwen2_5_vl")])
def test_cached_and_uncached_greedy_generation_equal_the_oracle(kind, text, config):
    ours, _ = models(kind, text, config)
    inputs = inputs_of(kind, text, rows())
    kw = dict(max_new_tokens=6, do_sample=False, suppress_tokens=visual_token_ids(ours.config))
    with torch.no_grad():
        cached = ours.generate(**inputs, **kw)
        uncached = ours.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    width = inputs["input_ids"].shape[1]
    for i in range(len(rows())):
        one = inputs_of(kind, text, rows()[i : i + 1])
        n = one["input_ids"].shape[1]
        stock, hooks = oracle(kind, text, config, rank_position=n - 1)
        with hooks[0], hooks[1]:
            expected = oracle_generate(stock, one, 6, kw["suppress_tokens"])
        assert until_eos(cached[i, width:].tolist(), ours) == until_eos(expected[0, n:].tolist(), ours)


@params([("llava", "llama", "shortv_fastv"), ("qwen2_5_vl", None, "shortv_fastv"), ("llava", "llama", "vtw")])
def test_beam_search_equals_the_oracle(kind, text, config):
    """num_beams=3: generate() repeats each prompt once per beam and reorders the cache between steps; the pruned
    layers' shorter cache and what each beam may attend to in it follow their beams. Each row against the oracle's
    uncached beam search, and a padded batch of the two rows gives each row's beams."""
    ours, _ = models(kind, text, config)
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=3, suppress_tokens=visual_token_ids(ours.config))
    two = rows()[:2]
    padded = inputs_of(kind, text, two)
    with torch.no_grad():
        together = ours.generate(**padded, **kw)
    for i, row in enumerate(two):
        one = inputs_of(kind, text, [row])
        n = one["input_ids"].shape[1]
        stock, hooks = oracle(kind, text, config, rank_position=n - 1)
        with torch.no_grad():
            got = ours.generate(**one, **kw)
            with hooks[0], hooks[1]:
                expected = stock.generate(**one, **kw, use_cache=False)
        assert got.tolist() == expected.tolist()
        generated = together[i, padded["input_ids"].shape[1] :].tolist()
        assert until_eos(generated, ours) == until_eos(got[0, n:].tolist(), ours)


def until_eos(tokens: list[int], model) -> list[int]:
    """``tokens`` up to the first end-of-sequence token, which generate() pads after and the oracle does not."""
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or ())
    return next((tokens[: i + 1] for i, t in enumerate(tokens) if t in eos), tokens)


@pytest.mark.parametrize("config", CONFIGS)
def test_the_cache_of_the_pruned_layers_holds_only_the_kept_tokens(config):
    layers, prune = CONFIGS[config]
    ours, _ = models("llava", "llama", config)
    one = inputs_of("llava", None, rows()[1:2])
    seq = one["input_ids"].shape[1]
    n_visual = int((one["input_ids"] == ours.config.image_token_id).sum())
    kept = round((1 - prune["ratio"]) * n_visual) if prune["method"] == "fastv" else 0
    cache = DynamicCache(config=ours.config.text_config)
    with torch.no_grad():
        ours(**one, **{cache_kwarg(): cache}, use_cache=True)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    k = prune["layer"]
    assert lengths == [seq] * k + [seq - n_visual + kept] * (len(lengths) - k)
    assert cache.get_seq_length() == seq  # positions go on from the whole prompt


@pytest.mark.parametrize("config", ["fastv", "shortv_fastv"])
def test_eager_and_sdpa_prune_alike(config):
    sdpa, _ = models("llava_next", "llama", config)
    eager, _ = models("llava_next", "llama", config, attn="eager")
    inputs = inputs_of("llava_next", None, rows())
    text = (inputs["attention_mask"] == 1) & (inputs["input_ids"] != sdpa.config.image_token_id)
    with torch.no_grad():  # removed rows' logits are their state before layer K put through the head: not compared
        torch.testing.assert_close(eager(**inputs).logits[text], sdpa(**inputs).logits[text], atol=2e-5, rtol=1e-4)


def test_bf16_generation_equals_the_bf16_oracle():
    ours, stock = models("llava", "llama", "shortv_fastv", dtype=torch.bfloat16)
    one = inputs_of("llava", None, rows()[1:2])
    one["pixel_values"] = one["pixel_values"].bfloat16()
    n = one["input_ids"].shape[1]
    ids = visual_token_ids(stock.config)
    with torch.no_grad():
        got = ours.generate(**one, max_new_tokens=6, do_sample=False, suppress_tokens=ids)
    with pruning_oracle_hooks(stock, FASTV, ids, n - 1), oracle_hooks(stock, [4, 1, 3], ids[0], ids):
        expected = oracle_generate(stock, one, 6, ids)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "kind,text",
    [("gemma3", None), ("llava", "qwen2_sliding"), ("llava", "mistral_sliding")],
)
def test_text_models_with_sliding_windows_after_layer_k_are_refused(kind, text):
    with pytest.raises(ValueError, match="sliding window"):
        load_shortv(folder(kind, text), [], FASTV)


@pytest.mark.parametrize(
    "prune,message",
    [
        ({"method": "fastv", "layer": 2}, "shortv_prune must be"),
        ({"method": "fastv", "layer": 0, "ratio": 0.5}, r"layer must be in \[1, 6\)"),
        ({"method": "vtw", "layer": 6}, r"layer must be in \[1, 6\)"),
        ({"method": "fastv", "layer": 2, "ratio": 1.0}, r"ratio .* must be in \(0, 1\)"),
        ({"method": "prune", "layer": 2}, "shortv_prune must be"),
    ],
)
def test_bad_pruning_configs_are_refused(prune, message):
    with pytest.raises(ValueError, match=message):
        load_shortv(tiny_dir("llava"), [], prune)


def test_a_static_cache_and_a_filled_cache_are_refused():
    ours, _ = models("llava", "llama", "fastv")
    one = inputs_of("llava", None, rows()[1:2])
    with pytest.raises(ValueError, match="empty dynamic cache"), torch.no_grad():
        ours.generate(**one, max_new_tokens=2, cache_implementation="static")


def test_attention_without_per_query_masks_is_refused():
    ours, _ = models("llava", "llama", "vtw")
    one = inputs_of("llava", None, rows()[1:2])
    text_model = ours.model.language_model
    previous = text_model.config._attn_implementation
    text_model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="'sdpa' or 'eager'"), torch.no_grad():
            ours(**one)
    finally:
        text_model.config._attn_implementation = previous


def _cli(*args):
    from click.testing import CliRunner

    from shortv_export.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@NEWEST_ONLY
def test_cli_writes_fastv_with_shortv_verifies_it_and_the_folder_loads_as_the_in_process_model(tmp_path):
    out = tmp_path / "out"
    result = _cli(tiny_dir("llava"), "--layers", "4,1,3", "--fastv", "2:0.5", "--out", out)
    assert result.exit_code == 0, result.output
    assert "token pruning: FastV K=2 R=50%" in result.output and "verified:" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["shortv_prune"] == FASTV and config["shortv_layers"] == [4, 1, 3]
    card = (out / "README.md").read_text()
    assert "combined with FastV (K=2, R=50%)" in card and "--fastv 2:0.5" in card
    reloaded = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    ours, _ = models("llava", "llama", "shortv_fastv")
    inputs = inputs_of("llava", None, rows())
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, ours(**inputs).logits)


def test_calibration_with_vtw_records_the_fidelity_of_what_is_written(tmp_path):
    out = tmp_path / "out"
    result = _cli(tiny_dir("llava"), "--n", "2", "--vtw", "3", "--samples", "4", "--out", out, "--no-verify")
    assert result.exit_code == 0, result.output
    fidelity = json.loads((out / "lc.json").read_text())["fidelity"]
    assert fidelity["prune"] == VTW and fidelity["samples"] == 4
    assert "--vtw 3" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--fastv", "2"], "give K:R"),
        (["--fastv", "2:1.5"], "give K:R"),
        (["--fastv", "2:0.5", "--vtw", "3"], "not both"),
        (["--vtw", "6"], r"--vtw: shortv_prune's layer must be in \[1, 6\)"),
        (["--fastv", "0:0.5"], r"--fastv: shortv_prune's layer must be in \[1, 6\)"),
    ],
)
def test_pruning_flags_are_checked_before_any_work(tmp_path, args, message):
    result = _cli(tiny_dir("llava"), "--layers", "1", *args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and re.search(message, result.stderr), result.output
    assert not (tmp_path / "out").exists()


def test_onnx_with_pruning_is_refused_at_once_for_a_family_whose_graph_does_not_prune(tmp_path):
    result = _cli(tiny_dir("llava_next"), "--layers", "1", "--fastv", "2:0.5", "--onnx", "--out", tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip() == (
        "Error: --onnx with --fastv: the ONNX export prunes tokens for LLaVA-1.5, Qwen2.5-VL, not LLaVA-NeXT; drop "
        "one of them"
    )


def test_a_sliding_window_model_is_refused_by_the_cli(tmp_path):
    result = _cli(tiny_dir("gemma3"), "--layers", "1", "--vtw", "2", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "sliding window" in result.stderr


def test_dry_run_and_target_flops_count_the_pruning():
    from shortv_export.flops import flops_summary

    plain = _cli(tiny_dir("llava"), "--layers", "4,1,3", "--dry-run")
    pruned = _cli(tiny_dir("llava"), "--layers", "4,1,3", "--fastv", "2:0.5", "--dry-run")
    ratio = lambda output: float(re.search(r"ratio ([0-9.]+)", output)[1])  # noqa: E731
    text_config = json.loads((tiny_dir("llava") / "config.json").read_text())["text_config"]
    n_visual = int(re.search(r"at (\d+) visual \+ (\d+) text", pruned.output)[1])
    n_text = int(re.search(r"at (\d+) visual \+ (\d+) text", pruned.output)[2])
    expected = flops_summary(text_config, n_visual, n_text, [4, 1, 3], FASTV)["ratio"]
    assert ratio(pruned.output) == round(expected, 3) < ratio(plain.output)
    # --target-flops picks N given FastV: fewer layers than without it
    plain_n = _cli(tiny_dir("llava"), "--target-flops", "0.6", "--dry-run").output
    pruned_n = _cli(tiny_dir("llava"), "--target-flops", "0.6", "--fastv", "2:0.5", "--dry-run").output
    n_of = lambda output: int(re.search(r"freeze the (\d+) lowest-LC layers", output)[1])  # noqa: E731
    assert n_of(pruned_n) < n_of(plain_n)


@NEWEST_ONLY  # the verify stage over a pruned folder: once (README Versions)
@pytest.mark.parametrize("prune", ["2:0.5", "vtw"])
def test_verify_catches_a_pruned_checkpoint_whose_decode_steps_see_the_wrong_keys(tmp_path, prune):
    """The verify stage's cache check (a padded batch, cached vs uncached) holds for pruned checkpoints: decode
    steps that attend to the padding slots of the pruned layers' cache (rows keep different counts) fail it."""
    from shortv_export import verify

    out = tmp_path / "out"
    flag = ["--fastv", prune] if prune != "vtw" else ["--vtw", "3"]
    result = _cli(tiny_dir("llava"), "--layers", "4,1", *flag, "--out", out, "--no-verify")
    assert result.exit_code == 0, result.output
    written = json.loads((out / "config.json").read_text())["shortv_prune"]
    figures = verify.verify_folder(out, tiny_dir("llava"), [4, 1], prune=written)
    assert figures["generate_max_abs_logits_diff_cached_vs_uncached"] <= figures["generate_cache_tolerance"]
    code = (out / "modeling_shortv.py").read_text()
    good = "seen = torch.cat([kept.ok[:, None, :].expand(-1, n_new, -1), tail], dim=-1)"
    assert good in code
    (out / "modeling_shortv.py").write_text(code.replace(good, good.replace("kept.ok[", "torch.ones_like(kept.ok)[")))
    with pytest.raises(verify.ShortVError, match="the cache is wrong"):
        verify.verify_folder(out, tiny_dir("llava"), [4, 1], prune=written)


@NEWEST_ONLY
def test_the_min_agreement_search_measures_n0_when_tokens_are_pruned(tmp_path):
    """With pruning, N = 0 is not the base model: the search reports what it measured there, not 100%."""
    out = tmp_path / "out"
    args = ["--n", "3", "--fastv", "2:0.5", "--samples", "8", "--min-agreement", "1.0", "--no-verify", "--out", out]
    result = _cli(tiny_dir("llava"), *args)
    assert result.exit_code == 0, result.output
    fidelity = json.loads((out / "lc.json").read_text())["fidelity"]
    assert fidelity["top1_agreement"] < 1.0 and fidelity["largest_n_above_min_agreement"] == 0
    assert fidelity["largest_n_top1_agreement"] < 1.0  # FastV alone already changes some answers here
