"""The pipeline as a Python call (`shortv_export.convert`), and what a new user of the command meets first."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_dir
from huggingface_hub import ModelCard

import shortv_export
import shortv_export.errors
from shortv_export.cli import main


def test_convert_runs_each_stage_once_in_order_and_returns_the_result(tmp_path, monkeypatch):
    import shortv_export.calibrate as calibrate
    import shortv_export.load as load
    import shortv_export.verify as verify
    import shortv_export.write as write

    calls = []
    for module, name in ((load, "resolve_model"), (calibrate, "calibrate"), (write, "write_checkpoint")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    original_verify = verify.verify_folder
    monkeypatch.setattr(
        verify, "verify_folder", lambda *a, **k: calls.append("verify_folder") or original_verify(*a, **k)
    )
    lines = []
    result = shortv_export.convert(
        str(tiny_dir("llava", 12)),
        n=3,
        out=tmp_path / "out",
        calibration=shortv_export.CalibrationOptions(samples=6, min_agreement=0.0),
        progress=False,
        log=lines.append,
    )
    assert calls == ["resolve_model", "calibrate", "write_checkpoint", "verify_folder"]
    assert isinstance(result, shortv_export.ConvertResult)
    assert result.out == (tmp_path / "out").resolve() and (result.out / "config.json").is_file()
    assert result.layers == result.lc.order[:3] == json.loads((result.out / "config.json").read_text())["shortv_layers"]
    assert result.n == 3 and result.num_layers == 12 and result.kind == "llava"
    assert 0 < result.flops["ratio"] < 1 and result.flops["tokens_from"] == "calibration set mean"
    assert result.lc.fidelity["layers"] == result.layers and result.lc.samples == 6
    v = result.verification
    assert v["generate_max_abs_logits_diff_cached_vs_uncached"] <= v["generate_cache_tolerance"]
    assert v["generate_equals_in_process"] and v["dtype"] == "float32" and v["device"] == "cpu"
    assert result.command.startswith("shortv-export ") and "--n 3" in result.command
    assert {f.name for f in result.files} >= {"config.json", "lc.json", "README.md", "model.safetensors"}
    assert any(line.startswith("wrote ") for line in lines) and any(line.startswith("verified:") for line in lines)


def test_importing_the_package_and_the_cli_loads_neither_torch_nor_transformers():
    code = (
        "import sys, shortv_export, shortv_export.cli; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"shortv-export {shortv_export.__version__}"
    assert shortv_export.__version__[0].isdigit() and shortv_export.__version__ != "0+unknown"


def test_dry_run_without_layers_prints_the_flops_ratio_and_the_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --out, ./<model>-shortv-n<N>, would be written
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--dry-run", "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "would calibrate LC on 4 samples of the embedded set" in result.output
    assert "ratio 0." in result.output and "(calibration set mean)" in result.output
    for name in ("config.json", "lc.json", "README.md", "model.safetensors"):
        assert name in result.output
    out = f"{tiny_dir('llava').name}-shortv-n4"  # 60% of 6 layers
    assert f"would write {out}/:" in result.output
    assert list(tmp_path.iterdir()) == []  # neither that folder nor anything else


def test_dry_run_with_onnx_says_what_is_missing(monkeypatch):
    import shortv_export.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_missing_onnx_modules", lambda: ["onnxruntime"])
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "2", "--onnx", "--dry-run"])
    assert result.exit_code == 0
    assert "Warning: --onnx needs onnxruntime: pip install 'shortv-export[onnx]'" in result.stderr
    real = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "2", "--onnx", "--out", "x"])
    assert real.exit_code == 2 and real.stderr.startswith("Error: --onnx needs onnxruntime")


def test_a_source_without_a_processor_is_one_error_line_naming_the_files(tmp_path):
    source = tmp_path / "no-processor"
    shutil.copytree(tiny_dir("llava"), source)
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (source / name).unlink(missing_ok=True)
    result = CliRunner().invoke(main, [str(source), "--layers", "2", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "has no processor: missing preprocessor_config.json or processor_config.json; tokenizer.json" in line


def _card(folder) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_card_of_a_local_source_names_no_hub_link_unless_given_a_base_model(tmp_path):
    plain, based = tmp_path / "plain", tmp_path / "based"
    common = ["--layers", "4,1", "-q"]
    assert CliRunner().invoke(main, [str(tiny_dir("llava")), *common, "--out", str(plain)]).exit_code == 0
    based_args = [str(tiny_dir("llava")), *common, "--out", str(based), "--base-model", "me/tiny-llava"]
    assert CliRunner().invoke(main, [*based_args, "--no-verify"]).exit_code == 0  # the card's verification: plain
    card = _card(plain)
    assert "huggingface.co/llava-" not in card.text and "a local checkpoint" in card.text
    assert card.data.base_model is None
    assert (
        _card(based).data.base_model == "me/tiny-llava"
        and "(https://huggingface.co/me/tiny-llava)" in _card(based).text
    )
    text = card.text
    assert "repo = 'plain'" in text and str(tmp_path) not in text  # the folder's name, not a local path
    assert "0.00 TFLOPs" not in text and "MFLOPs" in text  # tiny models get a unit that fits
    assert "Before publishing" not in text and "match the in-process ShortV model exactly" in text


def test_below_min_agreement_warns_and_names_the_largest_n_that_stays_above(tmp_path):
    out = tmp_path / "out"
    args = [str(tiny_dir("llava", 12)), "--n", "9", "--samples", "8", "--out", str(out), "--no-verify", "-q"]
    result = CliRunner().invoke(main, [*args, "--min-agreement", "0.99"])
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    fidelity = json.loads((out / "lc.json").read_text())["fidelity"]
    good = fidelity["largest_n_above_min_agreement"]
    assert fidelity["top1_agreement"] < 0.99 and 0 <= good < 9
    assert "below --min-agreement 99%" in warning
    assert (f"--n {good} keeps" in warning) if good else ("no N >= 1 stays above it" in warning)
    assert "That is below the 99% this conversion was asked to keep" in (out / "README.md").read_text()
    quiet = CliRunner().invoke(main, [*args, "--overwrite", "--min-agreement", "0.0"])  # LC reused, no warning
    assert quiet.exit_code == 0 and "Warning" not in quiet.stderr
    assert "largest_n_above_min_agreement" not in json.loads((out / "lc.json").read_text())["fidelity"]


def test_modality_both_is_in_the_card(tmp_path):
    out = tmp_path / "both"
    args = [str(tiny_dir("llava")), "--n", "2", "--samples", "4", "--modality", "both", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--no-verify", "-q", "--min-agreement", "0"])
    assert result.exit_code == 0, result.output
    assert "Text-token LC (the paper's contrast" in (out / "README.md").read_text()


@pytest.mark.parametrize("n_tflops,expected", [(8.5, "8.50 TFLOPs"), (0.0032, "3.2 GFLOPs"), (4.17e-6, "4.17 MFLOPs")])
def test_flops_get_a_unit_that_fits(n_tflops, expected):
    from shortv_export.flops import format_flops

    assert format_flops(n_tflops) == expected


def test_overwrite_never_deletes_a_folder_this_tool_did_not_write(tmp_path, monkeypatch):
    mine = tmp_path / "my-work"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for out in (mine, tmp_path):  # an unrelated folder, and the current folder
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "1", "--out", str(out), "--overwrite"])
        assert result.exit_code == 2 and "--overwrite replaces only" in result.stderr, result.output
    assert (mine / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(tiny_dir("llava")), "--layers", "1", "--out", str(empty), "--overwrite", "-q", "--no-verify"]
    assert CliRunner().invoke(main, args).exit_code == 0  # an empty folder may be replaced
    assert CliRunner().invoke(main, args).exit_code == 0  # and so may an earlier ShortV output


@pytest.mark.parametrize("device,expected", [("cuda", "sees no CUDA GPU"), ("potato", "not a device torch knows")])
def test_a_device_this_machine_lacks_is_one_error_line(device, expected):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "1", "--device", device, "--dry-run"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: --device {device}: ") and expected in line


def test_behind_a_proxy_the_hub_is_not_probed_directly(monkeypatch):
    import socket

    from shortv_export.load import _check_reachable

    def refuse(*a, **k):
        raise AssertionError("probed the Hub directly")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    _check_reachable("llava-hf/llava-1.5-7b-hf")  # the client will go through the proxy; no direct probe


def test_the_reproduce_command_carries_every_option_that_changes_the_result(tmp_path):
    calibration = shortv_export.CalibrationOptions(samples=3, seed=2, dtype="fp32", min_agreement=0.5)
    result = shortv_export.convert(
        str(tiny_dir("llava")),
        n=2,
        calibration=calibration,
        onnx=True,
        onnx_dtype="fp16",
        onnx_quantize="int4",
        base_model="me/tiny",
        out=tmp_path / "x",
        dry_run=True,
        progress=False,
    )
    assert result.command == (
        "shortv-export me/tiny --n 2 --samples 3 --seed 2 --dtype fp32 --min-agreement 0.5 --onnx --onnx-dtype fp16 "
        "--onnx-quantize int4 --out x"
    )


def test_target_flops_is_settled_before_calibration(monkeypatch, tmp_path):
    import shortv_export.calibrate as calibrate

    monkeypatch.setattr(calibrate, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking"))
    for target, expected in (("1.0", "already met with no frozen layer"), ("1.5", "must be a ratio in (0, 1]")):
        result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--target-flops", target, "--out", str(tmp_path)])
        assert result.exit_code == 2 and expected in result.stderr, result.output
    dry = shortv_export.convert(str(tiny_dir("llava")), target_flops=0.9, dry_run=True, progress=False)
    assert 1 <= dry.n <= 6 and dry.flops["ratio"] <= 0.9 and dry.out.name.endswith(f"shortv-n{dry.n}")


def test_lc_is_recomputed_when_the_weights_change_in_place(tmp_path):
    import os

    source = tmp_path / "base"
    shutil.copytree(tiny_dir("llava"), source)
    out = tmp_path / "out"
    args = [str(source), "--n", "2", "--samples", "2", "--out", str(out), "--no-verify", "--min-agreement", "0"]
    assert CliRunner().invoke(main, args).exit_code == 0
    again = CliRunner().invoke(main, [*args, "--overwrite"])
    assert "reusing LC" in again.output
    weights = source / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # saved again
    changed = CliRunner().invoke(main, [*args, "--overwrite"])
    assert changed.exit_code == 0 and "reusing LC" not in changed.output and "calibrating LC" in changed.output


def test_interrupted_after_the_write_says_where_the_folder_is(tmp_path, monkeypatch):
    import shortv_export.verify as verify

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify_folder", interrupt)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--layers", "1", "--out", str(out), "-q"])
    assert result.exit_code == 130 and (out / "config.json").exists()
    assert result.stderr.strip() == f"Interrupted: {out} is written; interrupted before it was checked or pushed"


def test_a_folder_named_dot_gets_its_own_name(tmp_path, monkeypatch):
    source = tmp_path / "tiny-base"
    shutil.copytree(tiny_dir("llava"), source)
    monkeypatch.chdir(source)  # the default output would land inside the source: refused, under its real name
    with pytest.raises(shortv_export.errors.ShortVError, match="tiny-base/tiny-base-shortv-n1 is inside"):
        shortv_export.convert(".", layers="1", dry_run=True, progress=False)
    monkeypatch.chdir(tmp_path)
    assert shortv_export.convert("tiny-base/.", layers="1", dry_run=True, progress=False).out == Path(
        "tiny-base-shortv-n1"
    )
