"""The converter: `shortv-export MODEL --layers ... --out DIR`, its output folder and its bad-input behaviour."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner
from conftest import tiny_dir

from shortv_export.cli import main
from shortv_export.compat import TESTED_TRANSFORMERS, version_key
from shortv_export.select import PAPER_LAYERS


def cli(*args: str, env: dict | None = None):
    return CliRunner(env=env).invoke(main, [*map(str, args), "--no-verify"], catch_exceptions=False)


def digest(folder: Path) -> dict[str, str]:
    """Every file (name, bytes, mode) of a folder tree, to prove it was not modified."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def entries(folder: Path) -> list[str]:
    """What a folder holds, hidden entries included: nothing may be left beside the output."""
    return sorted(p.name for p in folder.iterdir())


def copy_of(kind: str, tmp_path: Path, name: str | None = None) -> Path:
    dest = tmp_path / (name or f"base-{kind}")
    shutil.copytree(tiny_dir(kind), dest)
    return dest


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_output_folder_holds_config_code_and_unchanged_weights(kind, tmp_path):
    base = copy_of(kind, tmp_path)
    before = digest(base)
    result = cli(base, "--layers", "4,1,3", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    model_class = {"llava": "ShortVLlava", "llava_next": "ShortVLlavaNext"}[kind] + "ForConditionalGeneration"
    assert config["model_type"] == f"shortv_{kind}"
    assert config["shortv_layers"] == [4, 1, 3]
    assert config["architectures"] == [model_class]
    assert config["auto_map"]["AutoModel"] == config["auto_map"]["AutoModelForImageTextToText"]
    assert config["auto_map"]["AutoModel"] == f"modeling_shortv_llava.{model_class}"
    assert config["auto_map"]["AutoConfig"].startswith("configuration_shortv.")
    assert config["shortv_transformers"] == {
        "tested": [TESTED_TRANSFORMERS[0], max(TESTED_TRANSFORMERS[1], transformers.__version__, key=version_key)],
        "converted_with": transformers.__version__,
    }
    base_config = json.loads((base / "config.json").read_text())
    ours = ("model_type", "shortv_layers", "shortv_transformers", "auto_map", "architectures")
    assert {k: v for k, v in config.items() if k not in ours} == {
        k: v for k, v in base_config.items() if k not in ("model_type", "architectures", "_name_or_path")
    }
    for name in ("configuration_shortv.py", "modeling_shortv.py", "modeling_shortv_llava.py"):
        assert (out / name).read_bytes() == (Path(__file__).parents[1] / "modeling" / name).read_bytes()
    for name in (
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert (out / "model.safetensors").stat().st_ino == (base / "model.safetensors").stat().st_ino  # hard link
    assert (out / "README.md").read_text().startswith("---\n")
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert entries(tmp_path) == [f"base-{kind}", "out"]  # nothing else left beside it
    assert digest(base) == before


def test_conversion_never_reads_weights(tmp_path, monkeypatch):
    """Weights are linked or copied as files, never deserialised."""
    import safetensors
    import safetensors.torch
    import torch

    def forbidden(*a, **k):
        raise AssertionError("weights were loaded")

    for module, name in (
        (safetensors, "safe_open"),
        (safetensors.torch, "load_file"),
        (torch, "load"),
        (safetensors.torch, "load"),
    ):
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("cross-device")))  # force copies
    base = copy_of("llava_next", tmp_path)
    result = cli(base, "--layers", "0", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    out_weights, base_weights = tmp_path / "out" / "model.safetensors", base / "model.safetensors"
    assert out_weights.read_bytes() == base_weights.read_bytes()
    assert out_weights.stat().st_ino != base_weights.stat().st_ino  # copied, since linking failed


def test_sharded_weights_and_index_are_carried(tmp_path):
    from transformers import AutoModelForImageTextToText

    base = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(tiny_dir("llava")).save_pretrained(base, max_shard_size="300KB")
    for f in tiny_dir("llava").iterdir():
        if not (base / f.name).exists():
            shutil.copy2(f, base / f.name)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1
    assert cli(base, "--layers", "2", "--out", tmp_path / "out", "-q").exit_code == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()


def test_default_output_name_and_overwrite(tmp_path, monkeypatch):
    base = copy_of("llava", tmp_path, "my-llava")
    monkeypatch.chdir(tmp_path)
    assert cli(base, "--layers", "5,2", "-q").exit_code == 0
    out = tmp_path / "my-llava-shortv-n2"
    assert json.loads((out / "config.json").read_text())["shortv_layers"] == [5, 2]
    (out / "stale.txt").write_text("from an earlier run")
    refused = cli(base, "--layers", "5,2", "-q")
    assert refused.exit_code == 2 and (out / "stale.txt").exists()
    assert cli(base, "--layers", "5,2", "--overwrite", "-q").exit_code == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert entries(tmp_path) == ["my-llava", "my-llava-shortv-n2"]


def test_overwrite_into_a_missing_folder_just_writes_it_and_quiet_prints_only_the_result(tmp_path):
    base = copy_of("llava", tmp_path)
    out = tmp_path / "new" / "out"
    result = cli(base, "--layers", "3,1", "--out", out, "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out}\n" and result.stderr == ""
    assert json.loads((out / "config.json").read_text())["shortv_layers"] == [3, 1]


def _fail_the_write(monkeypatch):
    import shortv_export.write as write

    def disk_full(src, dest):  # the weights come last: the new folder is nearly complete
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(write, "_link_or_copy", disk_full)
    return []


def _fail_the_onnx_export(monkeypatch):
    import shortv_export.pipeline as pipeline

    def mismatch(folder, *args):  # after every file of the new folder is written
        assert (folder / "model.safetensors").exists()
        raise pipeline.ShortVError("ONNX Runtime differs from PyTorch past the tolerance")

    monkeypatch.setattr(pipeline, "_missing_onnx_modules", lambda: [])
    monkeypatch.setattr(pipeline, "_export", mismatch)
    return ["--onnx"]


@pytest.mark.parametrize("failure", [_fail_the_write, _fail_the_onnx_export], ids=["write", "onnx export"])
def test_a_failed_overwrite_leaves_the_old_folder_intact(failure, tmp_path, monkeypatch):
    """--overwrite replaces the old folder only once the new one is complete: a run that fails midway (the write,
    or the ONNX export inside it) leaves the old folder byte for byte as it was, and nothing beside it."""
    base, out = copy_of("llava", tmp_path), tmp_path / "out"
    assert cli(base, "--layers", "4,1", "--out", out, "-q").exit_code == 0
    (out / "notes.txt").write_text("the user's own file, in the old folder")
    before = digest(out)
    extra = failure(monkeypatch)
    result = CliRunner().invoke(
        main, [str(base), "--layers", "2", "--out", str(out), "--overwrite", "--no-verify", *extra]
    )
    assert result.exit_code != 0, result.output
    assert digest(out) == before
    assert entries(tmp_path) == ["base-llava", "out"]


def test_dry_run_prints_plan_and_writes_nothing(tmp_path):
    base = copy_of("llava", tmp_path)
    result = cli(base, "--layers", "4,1,3", "--out", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "ratio" in result.output and "model.safetensors" in result.output and "link" in result.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_layers_paper_uses_the_published_list(tmp_path):
    big = tiny_dir("llava", num_layers=32)
    base = tmp_path / "llava-1.5-7b-hf"
    shutil.copytree(big, base)
    result = cli(base, "--layers", "paper", "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "out" / "config.json").read_text())["shortv_layers"]
    assert layers == PAPER_LAYERS["llava-hf/llava-1.5-7b-hf"]


def _unsupported(tmp_path):
    base = copy_of("llava", tmp_path)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(config, model_type="idefics2")))
    return base, ["--layers", "1"]


def _pickle_only(tmp_path):
    base = copy_of("llava", tmp_path)
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    return base, ["--layers", "1"]


def _already_shortv(tmp_path):
    base = copy_of("llava", tmp_path)
    assert cli(base, "--layers", "1", "--out", tmp_path / "sv", "-q").exit_code == 0
    return tmp_path / "sv", ["--layers", "1", "--out", tmp_path / "again"]


def _output_exists(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    return copy_of("llava", tmp_path), ["--layers", "1", "--out", tmp_path / "taken"]


BAD = {
    "unsupported architecture": (_unsupported, "unsupported architecture"),
    "pickle weights only": (_pickle_only, "no safetensors"),
    "already ShortV": (_already_shortv, "already a ShortV checkpoint"),
    "layer out of range": (lambda t: (copy_of("llava", t), ["--layers", "1,6"]), "out of range"),
    "duplicate layers": (lambda t: (copy_of("llava", t), ["--layers", "1,2,1"]), "duplicate"),
    "not integers": (lambda t: (copy_of("llava", t), ["--layers", "1,x"]), "integers"),
    "empty layers": (lambda t: (copy_of("llava", t), ["--layers", ","]), "empty"),
    "unknown paper model": (lambda t: (copy_of("llava", t), ["--layers", "paper"]), "no published layer list"),
    "output exists": (_output_exists, "already exists"),
    "output is the source": (
        lambda t: (copy_of("llava", t), ["--layers", "1", "--out", t / "base-llava", "--overwrite"]),
        "source",
    ),
    "no such folder": (lambda t: (t / "missing" / "x", ["--layers", "1"]), "no such folder"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, tmp_path):
    make, expected = BAD[case]
    base, args = make(tmp_path)
    before = digest(tmp_path)
    result = CliRunner().invoke(main, [str(base), *map(str, args)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.output
    assert digest(tmp_path) == before


def test_offline_hub_id_is_a_clear_error(tmp_path):
    result = CliRunner(env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}).invoke(
        main, ["llava-hf/llava-1.5-7b-hf", "--layers", "paper"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "Error: llava-hf/llava-1.5-7b-hf is not a local folder, offline mode is on (HF_HUB_OFFLINE=1) and the Hub "
        "cache has no copy of it: download it once online, or pass a local folder"
    ]


def test_unreachable_hub_is_a_clear_error_with_the_whole_reason(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = CliRunner().invoke(main, ["llava-hf/llava-1.5-7b-hf", "--dry-run"])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("Error: llava-hf/llava-1.5-7b-hf is not a local folder and the Hub (http://127.0.0.1:9)")
    assert "Connection refused" in line and "..." not in line


def test_a_mistyped_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "examples" / "tiny-llava-easyvqa").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for model, expected in (
        (
            "examples/tiny-llava",
            "Error: examples/tiny-llava: no such folder; did you mean examples/tiny-llava-easyvqa?",
        ),
        ("./nowhere", "Error: ./nowhere: no such folder"),
        ("a/b/c", "Error: a/b/c: no such folder (and a/b does not exist either)"),
    ):
        result = CliRunner().invoke(main, [model, "--dry-run"])
        assert result.exit_code == 2 and result.stderr.strip() == expected, result.stderr


def test_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    import shortv_export.write as write

    calls = []

    def interrupt(src, dest):
        calls.append(dest)
        raise KeyboardInterrupt

    monkeypatch.setattr(write, "_link_or_copy", interrupt)
    base = copy_of("llava", tmp_path)
    result = CliRunner().invoke(main, [str(base), "--layers", "1", "--out", str(tmp_path / "out"), "-q", "--no-verify"])
    assert calls and result.exit_code == 130
    assert entries(tmp_path) == ["base-llava"]  # no output folder, and nothing half-written beside it


_SLOW_WRITER = """
import sys, time, pathlib
import shortv_export.write as write
real = write._link_or_copy
def slow(src, dest):
    pathlib.Path(sys.argv[1]).write_text(str(dest))
    time.sleep(60)
write._link_or_copy = slow
from shortv_export.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_leaves_no_output_folder(sig, tmp_path):
    base = copy_of("llava", tmp_path)
    marker, out = tmp_path / "writing", tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, str(marker), str(base), "--layers", "1", "--out", str(out), "-q"],
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "the writer never started"
    assert not out.exists()  # it is writing the weights, and no output folder has appeared
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not out.exists()
    if sig == signal.SIGTERM:  # cleaned up on the way out
        assert entries(tmp_path) == ["base-llava", "writing"]
    # a later run completes, and removes what a SIGKILLed run left behind
    assert cli(base, "--layers", "1", "--out", out, "-q").exit_code == 0
    assert entries(tmp_path) == ["base-llava", "out", "writing"]
    assert json.loads((out / "config.json").read_text())["shortv_layers"] == [1]
