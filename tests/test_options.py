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
