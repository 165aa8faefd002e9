"""The pipeline as a Python call (`shortv_export.convert`), and what a new user of the command meets first."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import tiny_dir
from huggingface_hub import ModelCard

import shortv_export
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
    assert result.verification["generate_cached_equals_uncached"] is True
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


def test_dry_run_without_layers_prints_the_flops_ratio_and_the_files(tmp_path):
    result = CliRunner().invoke(main, [str(tiny_dir("llava")), "--dry-run", "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "would calibrate LC on 4 samples of the embedded set" in result.output
    assert "ratio 0." in result.output and "(calibration set mean)" in result.output
    for name in ("config.json", "lc.json", "README.md", "model.safetensors"):
        assert name in result.output
    assert not any(p.name.endswith("shortv-n4") for p in tmp_path.iterdir())


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
    assert (
        CliRunner()
        .invoke(main, [str(tiny_dir("llava")), *common, "--out", str(based), "--base-model", "me/tiny-llava"])
        .exit_code
        == 0
    )
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
