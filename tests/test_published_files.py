"""What a written folder publishes: no absolute local path anywhere (card, lc.json, config, model files), a
reproduce command that names the output folder and no local path, and no training leftovers from the source."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner
from conftest import tiny_dir

from shortv_export.cli import main
from shortv_export.data import DEFAULT_DIR


def test_the_written_folder_holds_no_local_path_and_no_training_leftovers(tmp_path):
    source = tmp_path / "my-base"
    shutil.copytree(tiny_dir("llava"), source)
    (source / "metrics.json").write_text(json.dumps({"test_accuracy": 0.9, "data": str(tmp_path)}))
    calib = tmp_path / "calib"
    shutil.copytree(DEFAULT_DIR, calib)  # a local calibration file, referenced by a path under tmp_path
    out = tmp_path / "out"
    args = [str(source), "--n", "2", "--samples", "3", "--calib", str(calib / "samples.jsonl"), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert not (out / "metrics.json").exists()
    for path in out.rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            text = path.read_bytes().decode("utf-8", errors="replace")
            for local in {str(tmp_path), str(tmp_path.resolve())}:
                assert local not in text, (path.name, local)
    lc = json.loads((out / "lc.json").read_text())
    assert lc["calibration"]["model"] == "my-base" and lc["calibration"]["set"] == "samples.jsonl"
    card = (out / "README.md").read_text()
    command = card.split("## Reproduce")[1].split("```bash\n")[1].split("\n")[0]
    assert command == "shortv-export my-base --n 2 --calib samples.jsonl --samples 3 --seed 0 --out out"
