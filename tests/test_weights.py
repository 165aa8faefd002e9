"""Broken weight files: an empty, truncated or corrupted ``model.safetensors`` is one ``Error:`` line naming the
file and what is wrong (exit 2), found before anything is written, with or without calibration; weights whose
values are NaN (the header intact) are their own error, not a cache or ShortV failure."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_dir
from safetensors.torch import load_file, save_file

from shortv_export.cli import main


def _broken(tmp_path, how: str):
    source = tmp_path / "base"
    shutil.copytree(tiny_dir("llava"), source)
    weights = source / "model.safetensors"
    data = weights.read_bytes()
    if how == "empty":
        weights.write_bytes(b"")
    elif how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "corrupted header":
        weights.write_bytes(data[:8] + b"#" * 16 + data[24:])
    elif how == "not safetensors":
        weights.write_bytes(b"PK\x03\x04 a zip, say" + data[:100])
    elif how == "nan values":
        tensors = load_file(weights)
        for name in tensors:
            if name.endswith("embed_tokens.weight"):
                tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_file(tensors, weights, metadata={"format": "pt"})
    return source


EXPECTED = {
    "empty": "weight file model.safetensors is empty (0 bytes)",
    "truncated": "weight file model.safetensors is truncated: its header needs",
    "corrupted header": "weight file model.safetensors is not a safetensors file (its header does not parse)",
    "not safetensors": "weight file model.safetensors is not a safetensors file or is truncated",
}


@pytest.mark.parametrize("how", list(EXPECTED))
@pytest.mark.parametrize("selection", [["--n", "2", "--samples", "2"], ["--layers", "1"]])
def test_a_broken_weight_file_is_one_error_line_before_anything_is_written(tmp_path, how, selection):
    source = _broken(tmp_path, how)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(source), *selection, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and EXPECTED[how] in lines[0], result.stderr
    assert "download or save it again" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_nan_weights_are_their_own_error_in_calibration_and_in_verification(tmp_path):
    source = _broken(tmp_path, "nan values")
    calibrated = CliRunner().invoke(main, [str(source), "--n", "2", "--samples", "2", "--out", str(tmp_path / "a")])
    assert calibrated.exit_code == 2 and "LC is not finite (NaN or inf)" in calibrated.stderr, calibrated.output
    assert "cache" not in calibrated.stderr
    given = CliRunner().invoke(main, [str(source), "--layers", "1", "--out", str(tmp_path / "b")])
    assert given.exit_code == 2, given.output
    assert "logits are not finite (NaN or inf)" in given.stderr and "the cache is wrong" not in given.stderr
