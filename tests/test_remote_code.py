"""The written folder loads, as a user would load it, in a fresh process that cannot import this project."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from functools import cache

import pytest
import torch
from click.testing import CliRunner
from conftest import batch, image, tiny_dir
from transformers import AutoProcessor

from shortv_export.cli import main
from shortv_export.families import FAMILIES
from shortv_export.models import load_shortv

# The families whose stock processors load without torchvision (families.py): their converted folders must load
# and run with transformers alone. (The others need `pip install torchvision` for AutoProcessor, as the README says.)
WITHOUT_TORCHVISION = [kind for kind, family in FAMILIES.items() if not family.torchvision]

USER_SCRIPT = r"""
import json, sys
sys.modules["shortv_export"] = None  # neither this project's package nor its modeling/ may be imported
sys.modules["modeling"] = None
if sys.argv[1] == "alone":
    sys.modules["torchvision"] = None  # transformers alone: these families' processors must not need it
import numpy as np, torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline


def report(folder):
    report = {}
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    report["config"] = [type(config).__name__, config.shortv_layers]
    model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    report["auto_model"] = [type(model).__name__, sorted(info["missing_keys"]), sorted(info["unexpected_keys"])]
    model2 = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
    report["image_text_to_text"] = type(model2).__name__
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    report["processor"] = type(processor).__name__
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=img, text=prompt, return_tensors="pt")
    with torch.no_grad():
        report["logits"] = model(**inputs).logits[0, -1].tolist()
        report["generate"] = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()
        report["generate_eager"] = model2.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "what is this ?"}]}]
    answer = pipe(text=chat, max_new_tokens=6)
    report["pipeline_model"] = type(pipe.model).__name__
    report["pipeline"] = answer[0]["generated_text"][-1]["content"]
    return report


print("REPORT" + json.dumps({folder: report(folder) for folder in sys.argv[2:]}))
"""


def test_the_families_without_torchvision_are_the_four_the_readme_names():
    assert WITHOUT_TORCHVISION == ["llava", "llava_next", "idefics3", "gemma3"]


@pytest.mark.parametrize("kind", [k for k, f in FAMILIES.items() if f.video_processor])
def test_tiny_folders_save_the_video_processor_the_stock_processor_saves(kind):
    """Built without torchvision, a tiny folder still holds its processor's video processor (AutoProcessor on a
    machine with torchvision needs it), made with the image processor's settings."""
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    from shortv_export.tiny import VIDEO_PROCESSORS

    config = json.loads((tiny_dir(kind) / "processor_config.json").read_text())
    video, images = config["video_processor"], config["image_processor"]
    assert video == json.loads(VIDEO_PROCESSORS.read_text())[kind]
    name = VIDEO_PROCESSOR_MAPPING_NAMES[kind]  # {"torchvision": name}, the name None where torchvision is missing
    name = name.get("torchvision") if isinstance(name, dict) else name
    if name:
        assert video["video_processor_type"] == name
    assert video["video_processor_type"].endswith("VideoProcessor")
    shared = {"size", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "max_image_size"}
    assert {k: video[k] for k in shared & video.keys()} == {k: images[k] for k in shared & video.keys()}
    assert shared & video.keys() >= {"size", "image_mean", "image_std"}


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision")
def test_the_recorded_video_processors_are_what_the_stock_processors_save(tmp_path):
    """Where torchvision is installed: every family's processor files, built with the stock video processors,
    are byte for byte the files a machine without torchvision saves (scripts/record_tiny_video_processors.py)."""
    for name, prelude in (("stock", ""), ("alone", "import sys; sys.modules['torchvision'] = None\n")):
        subprocess.run([sys.executable, "-c", prelude + TINY_FILES, str(tmp_path / name)], check=True, timeout=600)
    stock = {p.relative_to(tmp_path / "stock"): p.read_bytes() for p in (tmp_path / "stock").rglob("*") if p.is_file()}
    alone = {p.relative_to(tmp_path / "alone"): p.read_bytes() for p in (tmp_path / "alone").rglob("*") if p.is_file()}
    assert len(stock) >= 4 * len(FAMILIES) and stock == alone


TINY_FILES = """
import sys
from pathlib import Path
from shortv_export import families, tiny
for kind in families.FAMILIES:
    build = tiny.build_family if kind in tiny.NEW_FAMILIES else tiny.build_tiny
    build(kind)[1].save_pretrained(Path(sys.argv[1]) / kind)
"""


@pytest.fixture(scope="session")
def fresh_reports(tmp_path_factory):
    """kind -> what USER_SCRIPT reported for its converted folder. One fresh process loads every family that
    needs torchvision ("with"), or does not ("alone"); each family's folder has its own remote code."""

    @cache
    def reports(mode: str) -> dict:
        root = tmp_path_factory.mktemp(f"fresh-{mode}")
        kinds = [kind for kind, family in FAMILIES.items() if family.torchvision == (mode == "with")]
        for kind in kinds:
            args = [str(tiny_dir(kind)), "--layers", "4,1,3", "--out", str(root / kind), "-q", "--no-verify"]
            assert CliRunner().invoke(main, args).exit_code == 0
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.update(HF_MODULES_CACHE=str(root / "modules"), HF_HUB_OFFLINE="1")
        proc = subprocess.run(
            [sys.executable, "-c", USER_SCRIPT, mode, *(str(root / kind) for kind in kinds)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        by_folder = json.loads(proc.stdout.split("REPORT", 1)[1])
        return {kind: by_folder[str(root / kind)] for kind in kinds}

    return lambda kind: reports("with" if FAMILIES[kind].torchvision else "alone")[kind]


@pytest.mark.xdist_group("fresh-process")  # the families share their fresh process
@pytest.mark.parametrize("kind", FAMILIES)
def test_fresh_process_loads_with_auto_classes_and_pipeline(kind, fresh_reports):
    """AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor and pipeline("image-text-to-text") on the
    converted folder, in a fresh process that cannot import this project, nor torchvision for the families that
    do not need it (the others run only where torchvision is installed)."""
    if FAMILIES[kind].torchvision:
        pytest.importorskip("torchvision", reason=f"{kind}'s processor needs torchvision")
    report = fresh_reports(kind)
    cls = FAMILIES[kind].model_class
    assert report["config"][1] == [4, 1, 3]
    assert report["auto_model"] == [cls, [], []]
    assert report["image_text_to_text"] == cls
    assert report["pipeline_model"] == cls
    # the image processor the fresh process had: the PIL one where it could not import torchvision
    backend = {} if FAMILIES[kind].torchvision else {"backend": "pil"}
    processor = AutoProcessor.from_pretrained(tiny_dir(kind), **backend)
    assert report["processor"] == type(processor).__name__
    assert isinstance(report["pipeline"], str) and report["pipeline"].strip()
    assert report["generate"] == report["generate_eager"]

    # the fresh process computed exactly what the in-process ShortV model computes
    inputs = batch(processor, [("what is this ?", [image(50, 40, 0)])])
    reference = load_shortv(tiny_dir(kind), [4, 1, 3]).eval()
    with torch.no_grad():
        expected = reference(**inputs).logits[0, -1]
        tokens = reference.generate(**inputs, max_new_tokens=6, do_sample=False)[0].tolist()
    assert torch.allclose(torch.tensor(report["logits"]), expected, atol=1e-5)
    assert report["generate"] == tokens
