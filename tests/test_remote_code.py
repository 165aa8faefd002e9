"""The written folder loads, as a user would load it, in a fresh process that cannot import this project."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
sys.modules["torchvision"] = None  # transformers alone: these families' processors must not need it
import numpy as np, torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

folder = sys.argv[1]
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
print("REPORT" + json.dumps(report))
"""


def test_the_families_without_torchvision_are_the_four_the_readme_names():
    assert WITHOUT_TORCHVISION == ["llava", "llava_next", "idefics3", "gemma3"]


@pytest.mark.parametrize("kind", WITHOUT_TORCHVISION)
def test_fresh_process_loads_with_auto_classes_and_pipeline(kind, tmp_path):
    """AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor and pipeline("image-text-to-text") on the
    converted folder, in a fresh process that can import neither this project nor torchvision."""
    out = tmp_path / "shortv"
    assert (
        CliRunner()
        .invoke(main, [str(tiny_dir(kind)), "--layers", "4,1,3", "--out", str(out), "-q", "--no-verify"])
        .exit_code
        == 0
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", USER_SCRIPT, str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    cls = FAMILIES[kind].model_class
    assert report["config"][1] == [4, 1, 3]
    assert report["auto_model"] == [cls, [], []]
    assert report["image_text_to_text"] == cls
    assert report["pipeline_model"] == cls
    processor = AutoProcessor.from_pretrained(tiny_dir(kind))
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
