"""Stage 6, verify: reload the written folder the way a user would, and check it before anything is published.

A fresh Python process that never imports this package loads the folder with
``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`` (dynamic-module cache in a
temporary folder) and runs a few calibration prompts. Its last-position logits must equal those of the
in-process ShortV model, no weight may be missing or unexpected, and with frozen layers the outputs must differ
from the base model's (ShortV is really on). It also generates greedily for a padded batch of 2 prompts, with the
KV cache and without it: the tokens must agree with each other and with the in-process model's, so a checkpoint
that caches wrong keys and values fails here. Against the base model it reports mean KL and top-1 agreement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .errors import ShortVError

# What a user runs: transformers only, nothing from shortv_export.
_USER_CODE = r"""
import json, sys, torch
from transformers import AutoModelForImageTextToText
folder, inputs_path, generate_path, out_path = sys.argv[1:5]
model, info = AutoModelForImageTextToText.from_pretrained(
    folder, trust_remote_code=True, dtype=torch.float32, attn_implementation="sdpa", output_loading_info=True
)
assert "shortv_export" not in sys.modules
inputs = torch.load(inputs_path, weights_only=True)
prompts = torch.load(generate_path, weights_only=True)
greedy = json.loads(sys.argv[5])
with torch.no_grad():
    logits = model.eval()(**inputs, logits_to_keep=1).logits[:, -1].float()
    cached = model.generate(**prompts, **greedy)
    uncached = model.generate(**prompts, **greedy, use_cache=False)
torch.save({"logits": logits, "cached": cached, "uncached": uncached}, out_path)
print(json.dumps({"class": type(model).__name__, "missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"]), "shortv_layers": model.config.shortv_layers}))
"""

TOLERANCE = 1e-4  # reloaded vs in-process, relative to the largest logit (same device, dtype and attention)
GENERATED_TOKENS = 8


def verify_folder(folder: str | Path, base: str | Path, layers: list[int], samples: int = 4) -> dict:
    """Check ``folder`` (the written checkpoint of ``base`` freezing ``layers``); raise ShortVError on failure."""
    import transformers
    from transformers import AutoProcessor

    from .calibrate import kl_and_top1
    from .data import load_calibration, prompt_batch
    from .models import load_shortv

    folder = Path(folder)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    chosen = load_calibration(None).samples[:: max(1, 40 // samples)][:samples]
    inputs = prompt_batch(processor, chosen)
    prompts = prompt_batch(processor, chosen[:2])  # left-padded: the rows differ in length

    model = load_shortv(base, layers, dtype=torch.float32, attn_implementation="sdpa").eval()
    # random or tiny models may pick <image>, which an uncached step would take for a placeholder
    greedy = dict(max_new_tokens=GENERATED_TOKENS, do_sample=False, suppress_tokens=[model.config.image_token_id])
    with torch.no_grad():
        shortv = model(**inputs, logits_to_keep=1).logits[:, -1].float()
        tokens = model.generate(**prompts, **greedy)
        model.model.shortv_layers = []  # the same weights on the stock path: the base model
        vanilla = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    del model

    with tempfile.TemporaryDirectory(prefix="shortv-verify-") as tmp:
        tmp = Path(tmp)
        torch.save(inputs, tmp / "inputs.pt")
        torch.save(prompts, tmp / "prompts.pt")
        env = dict(os.environ, HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
        paths = [str(folder.resolve()), *(str(tmp / name) for name in ("inputs.pt", "prompts.pt", "out.pt"))]
        result = subprocess.run(
            [sys.executable, "-c", _USER_CODE, *paths, json.dumps(greedy)],
            capture_output=True,
            text=True,
            cwd=tmp,
            env=env,
        )
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise ShortVError(f"verify: the written folder does not load with transformers alone: {tail[0]}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        out = torch.load(tmp / "out.pt", weights_only=True)
    reloaded = out["logits"]

    scale = float(shortv.abs().max()) or 1.0
    diff = float((reloaded - shortv).abs().max())
    kl, top1 = kl_and_top1(vanilla, reloaded)
    figures = {
        "samples": len(chosen),
        "class": report["class"],
        "max_abs_logits_diff_vs_in_process": diff,
        "tolerance": TOLERANCE * scale,
        "mean_kl_vs_base": kl,
        "top1_agreement_vs_base": top1,
        "generate_rows": int(tokens.shape[0]),
        "generate_new_tokens": GENERATED_TOKENS,
        "generate_cached_equals_uncached": torch.equal(out["cached"], out["uncached"]),
        "generate_equals_in_process": torch.equal(out["cached"], tokens),
        "transformers": transformers.__version__,
    }
    problems = []
    if report["missing"] or report["unexpected"]:
        problems.append(f"weights missing {report['missing'][:3]} / unexpected {report['unexpected'][:3]}")
    if report["shortv_layers"] != list(layers):
        problems.append(f"config shortv_layers {report['shortv_layers']} != {list(layers)}")
    if not figures["generate_cached_equals_uncached"]:
        problems.append("greedy tokens with the KV cache differ from those without it: the cache is wrong")
    elif not figures["generate_equals_in_process"]:
        problems.append("greedy tokens of the reloaded model differ from the in-process model's")
    if not diff <= TOLERANCE * scale:
        problems.append(f"reloaded logits differ from the in-process ShortV model by {diff:.3g}")
    if layers and torch.equal(reloaded, vanilla):
        problems.append("outputs equal the base model's: ShortV is not active")
    if problems:
        raise ShortVError("verify failed: " + "; ".join(problems))
    return figures
