"""Stage 6, verify: reload the written folder the way a user would, and check it before anything is published.

A fresh Python process that never imports this package loads the folder with
``AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`` (dynamic-module cache in a
temporary folder) and runs a few calibration prompts. Its last-position logits must equal those of the
in-process ShortV model, no weight may be missing or unexpected, and with frozen layers the outputs must differ
from the base model's (ShortV is really on). It also generates greedily for a padded batch of 2 prompts with the
KV cache, then runs the same tokens through one forward without the cache: each step's logits must match (within
the dtype's rounding), so a checkpoint that caches wrong keys and values fails here, and the tokens must equal the
in-process model's. Against the base model it reports mean KL and top-1 agreement. It runs on the device and in
the dtype given (the CLI's --device and --dtype: fp32 on the CPU, bf16 on a GPU).
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
settings = json.loads(sys.argv[5])
dtype = getattr(torch, settings["dtype"])
model, info = AutoModelForImageTextToText.from_pretrained(
    folder, trust_remote_code=True, dtype=dtype, attn_implementation="sdpa", output_loading_info=True
)
model = model.to(settings["device"]).eval()
assert "shortv_export" not in sys.modules
def place(batch):
    return {k: v.to(settings["device"], dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}
inputs = place(torch.load(inputs_path, weights_only=True))
prompts = place(torch.load(generate_path, weights_only=True))
with torch.no_grad():
    logits = model(**inputs, logits_to_keep=1).logits[:, -1].float().cpu()
    out = model.generate(**prompts, **settings["greedy"], return_dict_in_generate=True, output_logits=True)
    # The same tokens without the cache: one forward over prompt + generated tokens, positions as generate made
    # them; its logits at each generated step must match the cached steps' logits.
    n = prompts["input_ids"].shape[1]
    mask = torch.cat([prompts["attention_mask"], torch.ones_like(out.sequences[:, n:])], dim=1)
    if "mm_token_type_ids" in prompts:  # M-RoPE (Qwen2-VL): 3-D positions from the whole sequence, as the model
        types = prompts["mm_token_type_ids"]  # derives them; the generated tokens are text (type 0)
        extra = {"mm_token_type_ids": torch.cat([types, torch.zeros_like(out.sequences[:, n:]).to(types)], 1)}
    else:
        extra = {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}
    if (model.config.shortv_prune or {}).get("method") == "fastv":  # FastV ranks from the prompt's last token,
        extra["shortv_rank_positions"] = torch.full((mask.shape[0],), n - 1)  # as generate() makes it rank
    full = model(**dict(prompts, input_ids=out.sequences, attention_mask=mask, **extra), use_cache=False)
    uncached = full.logits[:, n - 1 : -1].float().cpu()
cached = torch.stack(out.logits, dim=1).float().cpu()
torch.save({"logits": logits, "tokens": out.sequences.cpu(), "cached": cached, "uncached": uncached}, out_path)
print(json.dumps({"class": type(model).__name__, "missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"]), "shortv_layers": model.config.shortv_layers,
                  "shortv_prune": model.config.shortv_prune}))
"""

TOLERANCE = 1e-4  # reloaded vs in-process, relative to the largest logit (same device, dtype and attention)
# cached vs uncached step logits, relative to the largest: the same maths in another order (and, in half
# precision, other rounding); a wrong cache is off by the size of the logits themselves
CACHE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
GENERATED_TOKENS = 8


def verify_folder(
    folder: str | Path,
    base: str | Path,
    layers: list[int],
    samples: int = 4,
    device: str | None = None,
    dtype: str = "fp32",
    threads: int | None = None,
    prune: dict | None = None,
) -> dict:
    """Check ``folder`` (the written checkpoint of ``base`` freezing ``layers``) on ``device`` (default the CPU) in
    ``dtype`` ("fp32", "bf16", "fp16", or "auto": fp32 on the CPU, bf16 on a GPU); raise ShortVError on failure."""
    import transformers

    from .data import load_calibration, prompt_batch
    from .load import load_processor
    from .numerics import kl_and_top1, resolve_dtype

    folder = Path(folder)
    device = device or "cpu"
    torch_dtype = resolve_dtype(dtype, device, None)
    processor = load_processor(folder)
    chosen = load_calibration(None).samples[:: max(1, 40 // samples)][:samples]
    inputs = prompt_batch(processor, chosen)
    prompts = prompt_batch(processor, chosen[:2])  # left-padded: the rows differ in length
    mine = _in_process(base, layers, inputs, prompts, device, torch_dtype, prune)
    settings = {"greedy": mine["greedy"], "device": device, "dtype": str(torch_dtype).removeprefix("torch.")}
    report, out = _reloaded(folder, inputs, prompts, settings, threads)

    shortv, vanilla, reloaded = mine["shortv"], mine["vanilla"], out["logits"]
    scale = float(shortv.abs().max()) or 1.0
    kl, top1 = kl_and_top1(vanilla, reloaded)
    cache_scale = float(out["cached"].abs().max()) or 1.0
    figures = {
        "samples": len(chosen),
        "class": report["class"],
        "device": device,
        "dtype": settings["dtype"],
        "max_abs_logits_diff_vs_in_process": float((reloaded - shortv).abs().max()),
        "tolerance": TOLERANCE * scale,
        "mean_kl_vs_base": kl,
        "top1_agreement_vs_base": top1,
        "generate_rows": int(mine["tokens"].shape[0]),
        "generate_new_tokens": GENERATED_TOKENS,
        "generate_max_abs_logits_diff_cached_vs_uncached": float((out["cached"] - out["uncached"]).abs().max()),
        "generate_cache_tolerance": CACHE_TOLERANCE[torch_dtype] * cache_scale,
        "generate_equals_in_process": torch.equal(out["tokens"], mine["tokens"]),
        "transformers": transformers.__version__,
    }
    if not all(bool(torch.isfinite(t).all()) for t in (shortv, vanilla, reloaded, out["cached"])):
        raise ShortVError(
            f"verify failed: the model's logits are not finite (NaN or inf) in {settings['dtype']}: the weights hold "
            "NaN/inf values, or the dtype overflows (try --dtype fp32)"
        )
    active = not ((layers or prune) and torch.equal(reloaded, vanilla))
    problems = _problems(figures, report, layers, active, prune)
    if problems:
        raise ShortVError("verify failed: " + "; ".join(problems))
    return figures


def _in_process(base, layers, inputs: dict, prompts: dict, device: str, torch_dtype, prune=None) -> dict:
    """The in-process ShortV model's last-position logits and greedy tokens, and the base model's logits (the same
    weights on the stock path)."""
    from .models import load_shortv, visual_token_ids

    model = load_shortv(base, layers, prune, dtype=torch_dtype, attn_implementation="sdpa").to(device).eval()
    # random or tiny models may pick <image>, which a later step without the cache would take for a placeholder
    greedy = dict(max_new_tokens=GENERATED_TOKENS, do_sample=False, suppress_tokens=visual_token_ids(model.config))

    def place(batch):
        return {k: v.to(device, torch_dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}

    with torch.no_grad():
        shortv = model(**place(inputs), logits_to_keep=1).logits[:, -1].float().cpu()
        tokens = model.generate(**place(prompts), **greedy).cpu()
        model.model.shortv_layers, model.model.shortv_prune = [], None  # the same weights on the stock path
        vanilla = model(**place(inputs), logits_to_keep=1).logits[:, -1].float().cpu()
    return {"shortv": shortv, "tokens": tokens, "vanilla": vanilla, "greedy": greedy}


def _reloaded(folder: Path, inputs: dict, prompts: dict, settings: dict, threads: int | None) -> tuple[dict, dict]:
    """What the folder gives in a fresh process with transformers alone (``_USER_CODE``): its report (class,
    missing and unexpected weights, layers) and its outputs (logits, tokens, cached and uncached step logits)."""
    with tempfile.TemporaryDirectory(prefix="shortv-verify-") as tmp:
        tmp = Path(tmp)
        torch.save(inputs, tmp / "inputs.pt")
        torch.save(prompts, tmp / "prompts.pt")
        env = dict(os.environ, HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", PYTHONPATH="")
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        paths = [str(folder.resolve()), *(str(tmp / name) for name in ("inputs.pt", "prompts.pt", "out.pt"))]
        result = run_user_code(_USER_CODE, [*paths, json.dumps(settings)], env, tmp)
        if result.returncode != 0:
            tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise ShortVError(f"verify: the written folder does not load with transformers alone: {tail[0]}")
        return json.loads(result.stdout.strip().splitlines()[-1]), torch.load(tmp / "out.pt", weights_only=True)


def run_user_code(code: str, argv: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c code *argv`` in a fresh process (its output captured): the one place verification starts one."""
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=cwd, env=env)


def _problems(figures: dict, report: dict, layers: list[int], active: bool, prune: dict | None = None) -> list[str]:
    """What is wrong with the reloaded folder, from its figures and report (empty: nothing)."""
    problems = []
    if report["missing"] or report["unexpected"]:
        problems.append(f"weights missing {report['missing'][:3]} / unexpected {report['unexpected'][:3]}")
    if report["shortv_layers"] != list(layers):
        problems.append(f"config shortv_layers {report['shortv_layers']} != {list(layers)}")
    if report.get("shortv_prune") != prune:
        problems.append(f"config shortv_prune {report.get('shortv_prune')} != {prune}")
    cache_diff = figures["generate_max_abs_logits_diff_cached_vs_uncached"]
    if not cache_diff <= figures["generate_cache_tolerance"]:
        problems.append(
            f"generating with the KV cache gives other logits than without it (max diff {cache_diff:.3g}, "
            f"tolerance {figures['generate_cache_tolerance']:.3g}): the cache is wrong"
        )
    elif not figures["generate_equals_in_process"]:
        problems.append("greedy tokens of the reloaded model differ from the in-process model's")
    diff = figures["max_abs_logits_diff_vs_in_process"]
    if not diff <= figures["tolerance"]:
        problems.append(f"reloaded logits differ from the in-process ShortV model by {diff:.3g}")
    if not active:
        problems.append("outputs equal the base model's: ShortV is not active")
    return problems
