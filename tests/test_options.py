"""Options checked once, before any long work, each bad one an Error line with exit code 2."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import tiny_dir

from shortv_export.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(tiny_dir("llava")), *args])


def test_more_samples_than_the_set_holds_is_an_error():
    result = _run("--samples", "999", "--dry-run")
    assert result.exit_code == 2 and "--samples 999: the calibration set default has 40 samples" in result.stderr


def test_a_base_model_that_is_no_hub_id_is_refused_before_it_reaches_the_card(tmp_path):
    result = _run("--layers", "1", "--base-model", "not a valid id!!", "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "not a Hub repo id" in result.stderr
    assert not (tmp_path / "o").exists()


def test_one_frozen_layer_is_one_layer():
    result = _run("--layers", "1", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "frozen for visual tokens: 1 layer [1]" in result.output and "1 layers" not in result.output


def test_threads_sets_the_cpu_threads_of_the_run(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        assert _run("--threads", "0", "--dry-run").exit_code == 2
        result = _run("--layers", "1", "--threads", "1", "--out", str(tmp_path / "o"), "-q")
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_quiet_dry_run_prints_the_files_it_would_write():
    result = _run("--layers", "1", "--dry-run", "-q")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("would write ") and any("model.safetensors" in line for line in lines)
    assert not any(line.startswith("frozen for visual tokens") for line in lines)


def test_a_processor_package_that_is_missing_is_named(tmp_path, monkeypatch):
    import importlib.util
    import json

    import pytest

    from shortv_export.errors import ShortVError
    from shortv_export.load import load_processor

    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "shortv_smolvlm"}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "num2words" else real(name, *a))
    with pytest.raises(ShortVError, match="SmolVLM's processor needs num2words: pip install num2words"):
        load_processor(folder)
