"""Stage 2, calibrate: Layer Contribution (LC) of every decoder layer (docs/method.md section 2).

LC_l = mean over samples of KL(P_l || P_orig) at the last prompt position, full vocabulary, fp32, where P_l is
the next-token distribution with only layer l freezing the chosen rows (visual, or text for the contrast).

Prefix reuse: one original run per batch caches every layer's input H_0..H_L. Freezing rows R in layer l gives
exactly ``where(R, H_l, H_{l+1})`` after layer l (the other rows are computed as in the dense layer), so the
modified run starts at layer l+1: L(L-1)/2 layer forwards for all layers instead of L*L.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import CalibrationSet, prompt_batch
from .errors import ShortVError
from .load import Source
from .modeling.modeling_shortv import MASK_FUNCTIONS, attention_types
from .models import text_model, visual_token_ids
from .numerics import kl, resolve_dtype
from .util import progress_bar

MODALITIES = ("visual", "both")


@dataclass
class LCResult:
    visual: list[float]
    text: list[float] | None
    samples: int
    calibration: dict[str, Any]
    fidelity: dict[str, Any] | None = field(default=None)

    @property
    def order(self) -> list[int]:
        """Layer ids, lowest visual LC first (ties by layer id)."""
        return sorted(range(len(self.visual)), key=lambda i: (self.visual[i], i))

    def to_json(self) -> str:
        data = {
            "metric": "kl_last_token",
            "samples": self.samples,
            "visual": self.visual,
            "text": self.text,
            "order": self.order,
            "calibration": self.calibration,
        }
        if self.fidelity is not None:
            data["fidelity"] = self.fidelity
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LCResult:
        data = json.loads(text)
        return cls(data["visual"], data.get("text"), data["samples"], data["calibration"], data.get("fidelity"))


LC_METHOD = 2  # bumped when the computation changes (2: per-layer sliding-window masks)


def model_fingerprint(source: Source) -> str:
    """Hash of config.json and the weight files' names, sizes and modification times (for a Hub download, the
    snapshot's commit): the model LC was computed on. Weights saved again in place change it."""
    h = hashlib.sha256((source.path / "config.json").read_bytes())
    if source.repo_id is not None:
        h.update(f"commit:{source.path.name}".encode())
    for name in sorted(source.weights):
        path = source.path / name
        stat = path.stat() if path.exists() else None
        h.update(f"{name}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}".encode())
    return h.hexdigest()[:16]


def calibration_key(source: Source, calib: CalibrationSet, modality: str, dtype: torch.dtype) -> dict[str, Any]:
    """What makes two calibrations the same: the model, the samples and how they were run."""
    return {
        "method": LC_METHOD,
        "model": source.repo_id or source.name,  # no local path: lc.json is published
        "model_fingerprint": model_fingerprint(source),
        "set": public_name(calib.name),
        "set_fingerprint": calib.fingerprint(),
        "seed": calib.seed,
        "samples": len(calib.samples),
        "modality": modality,
        "dtype": str(dtype).removeprefix("torch."),
    }


def public_name(name: str) -> str:
    """A calibration set's name as published: ``default`` or ``hf:...`` as it is, a local file or folder by its
    name alone (no local path leaves the machine)."""
    return name if name == "default" or name.startswith("hf:") else Path(name).name


def reusable(lc_file: Path, key: dict[str, Any]) -> LCResult | None:
    """The LC stored in ``lc_file`` if it was computed with the same ``key``, else None."""
    try:
        stored = LCResult.from_json(lc_file.read_text())
    except (OSError, ValueError, KeyError):
        return None
    same = all(stored.calibration.get(k) == v for k, v in key.items() if k != "model")  # model: by fingerprint
    return stored if same else None


def load_model(source: Source, *, device: str | None = None, dtype: str = "auto", device_map: str | None = None):
    """The base model (stock class, one copy) and its processor, ready for calibration. The processor loads first:
    if it cannot (a missing package), that is said before the weights are read."""
    from .load import load_processor

    processor = load_processor(source.path)
    return load_base_model(source, device=device, dtype=dtype, device_map=device_map), processor


def load_base_model(source: Source, *, device: str | None = None, dtype: str = "auto", device_map: str | None = None):
    """The base model (stock class, one copy) in ``dtype`` on ``device`` (or spread by ``device_map``)."""
    from transformers import AutoModelForImageTextToText

    torch_dtype = resolve_dtype(dtype, device, device_map)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForImageTextToText.from_pretrained(source.path, **kwargs).eval()
    if not device_map:
        model.to(device)
    return model


class _Captured(Exception):
    pass


def _text_model_inputs(model, inputs: dict) -> dict:
    """The keyword arguments the stock model hands its text model for ``inputs`` (images merged into
    ``inputs_embeds``, the family's own position ids): the stock forward runs up to that call, no further."""
    captured = {}

    def capture(_module, _args, kwargs):
        captured.update(kwargs)
        raise _Captured

    hook = text_model(model).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model.model(**inputs, use_cache=False)
    except _Captured:
        pass
    except (ValueError, RuntimeError) as err:
        raise ShortVError(
            f"the model does not take the processor's inputs ({' '.join(str(err).split())}): is the processor "
            "the one saved with the model?"
        ) from None
    finally:
        hook.remove()
    return captured


class _Batch:
    """One padded batch's original run: every layer's input, and what later runs need to continue it."""

    def __init__(self, model, processor, samples, cache_device):
        self.model = model
        self.layer_forwards = 0  # decoder-layer forwards run for this batch, original run included
        self.lm = lm = text_model(model)
        self.layers = list(lm.layers)
        inputs = prompt_batch(processor, samples)  # left-padded: the last position ends every prompt
        first = next(model.parameters()).device
        inputs = {k: v.to(first) for k, v in inputs.items()}
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        self.visual = torch.isin(ids, torch.tensor(visual_token_ids(model.config), device=ids.device))
        self.text = (~self.visual) & attention.bool()
        self.n_visual = self.visual.sum(1).tolist()
        self.n_text = self.text.sum(1).tolist()
        with torch.no_grad():
            given = _text_model_inputs(model, inputs)
            hidden = given["inputs_embeds"]
            positions = given.get("position_ids")
            if positions is None:  # 1-D RoPE: positions that ignore left padding, so a batched row computes
                positions = (attention.cumsum(-1) - 1).clamp(min=0)  # exactly what it computes alone
            # (M-RoPE: the family's 3-D positions, which already ignore padding)
            self.position_ids = positions if positions.ndim == 2 else None  # what masks and layers see
            kinds = attention_types(lm.config)
            # cos/sin per attention type (Gemma 3 has a RoPE per type; the others one for all)
            per_type = "layer_type" in inspect.signature(lm.rotary_emb.forward).parameters
            rope = {kind: lm.rotary_emb(hidden, positions, *([kind] if per_type else [])) for kind in set(kinds)}
            self.position_embeddings = [rope[kind] for kind in kinds]
            # Each layer's mask as the stock model builds it: the 4-D masks it hands its text model (Gemma 3's
            # let an image's tokens see each other), else causal or sliding window from the padding mask.
            given_masks = given.get("attention_mask")
            masks = {
                kind: given_masks[kind]
                if isinstance(given_masks, dict)
                else MASK_FUNCTIONS[kind](lm.config, hidden, attention, None, position_ids=self.position_ids)
                for kind in set(kinds)
            }
            self.masks = [masks[kind] for kind in kinds]
            # Qwen3-VL's deepstack: vision features the text model adds to the visual rows after its first layers
            self.deepstack = (given.get("deepstack_visual_embeds") or [], given.get("visual_pos_masks"))
            self.cache_device = cache_device or _cache_device(hidden, len(self.layers))
            self.inputs = [hidden.to(self.cache_device)]  # H_0 .. H_L
            for i in range(len(self.layers)):
                hidden = self.between(i, self.layer(i, hidden))
                self.inputs.append(hidden.to(self.cache_device))
            self.log_probs = self.head(hidden)

    def between(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """What the text model does to layer ``i``'s output before the next layer: Qwen3-VL adds deepstack
        features to the visual rows after its first layers; the others nothing."""
        features, rows = self.deepstack
        if i >= len(features):
            return hidden
        return self.lm._deepstack_process(hidden, rows, features[i])

    def layer(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        device = layer.input_layernorm.weight.device
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731  (device_map may spread layers)
        self.layer_forwards += 1
        return layer(
            move(hidden),
            attention_mask=move(self.masks[i]),
            position_ids=move(self.position_ids),
            position_embeddings=tuple(move(t) for t in self.position_embeddings[i]),
            use_cache=False,
        )

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the next token after each row's last prompt position, in fp32 (fp64 for an fp64
        model)."""
        lm = self.lm
        last = hidden[:, -1].to(lm.norm.weight.device)
        logits = self.model.lm_head(lm.norm(last).to(self.model.lm_head.weight.device))
        return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)

    def run_from(self, start: int, rows: torch.Tensor, frozen: set[int]) -> torch.Tensor:
        """Log-probs when ``rows`` are frozen in ``frozen``, all of which are >= ``start``; reuses H_start."""
        hidden = self.inputs[start]
        with torch.no_grad():
            for i in range(start, len(self.layers)):
                if i == start and i in frozen:  # layer ``start`` needs no forward: its output is known
                    out = self.inputs[i + 1]
                else:
                    out = self.between(i, self.layer(i, hidden))
                if i in frozen:  # frozen rows keep the layer's input (and get what follows the layer)
                    hidden = self.between(i, hidden.to(out.device))
                    out = torch.where(rows.to(out.device).unsqueeze(-1), hidden, out)
                hidden = out
            return self.head(hidden)


def _cache_device(hidden: torch.Tensor, num_layers: int) -> torch.device:
    """Keep the L+1 cached layer inputs on the model's GPU when they fit in half its free memory, else on CPU."""
    if hidden.device.type != "cuda":
        return hidden.device
    needed = (num_layers + 1) * hidden.numel() * hidden.element_size()
    free, _ = torch.cuda.mem_get_info(hidden.device)
    return hidden.device if needed < free // 2 else torch.device("cpu")


def _batches(calib: CalibrationSet, batch_size: int):
    for start in range(0, len(calib.samples), batch_size):
        yield calib.samples[start : start + batch_size]


def calibrate(
    model,
    processor,
    calib: CalibrationSet,
    *,
    modality: str = "visual",
    batch_size: int = 8,
    progress: bool = True,
    key: dict[str, Any] | None = None,
    cache_device=None,
) -> LCResult:
    """LC of every decoder layer for visual tokens (and text tokens with ``modality='both'``)."""
    if modality not in MODALITIES:
        raise ShortVError(f"--modality {modality!r}: choose one of {', '.join(MODALITIES)}")
    num_layers = len(text_model(model).layers)
    sums = {"visual": torch.zeros(num_layers, dtype=torch.float64)}
    if modality == "both":
        sums["text"] = torch.zeros(num_layers, dtype=torch.float64)
    n_batches = math.ceil(len(calib.samples) / batch_size)
    bar = progress_bar(n_batches * num_layers * len(sums), "calibrating LC", progress, unit="layer")
    tokens = {"visual": 0, "text": 0}
    forwards = 0
    for samples in _batches(calib, batch_size):
        batch = _Batch(model, processor, samples, cache_device)
        tokens["visual"] += sum(batch.n_visual)
        tokens["text"] += sum(batch.n_text)
        for name, total in sums.items():
            rows = batch.visual if name == "visual" else batch.text
            for layer in range(num_layers):
                total[layer] += kl(batch.run_from(layer, rows, {layer}), batch.log_probs).double().sum().cpu()
                bar.update(1)
        forwards += batch.layer_forwards
    bar.close()
    n = len(calib.samples)
    mean = {name: [float(v) for v in (total / n).tolist()] for name, total in sums.items()}
    info = dict(
        key or {},
        batch_size=batch_size,
        layer_forwards=forwards,
        n_visual_mean=tokens["visual"] / n,
        n_text_mean=tokens["text"] / n,
    )
    return LCResult(mean["visual"], mean.get("text"), n, info)


def fidelity(
    model,
    processor,
    calib: CalibrationSet,
    layers: list[int],
    *,
    batch_size: int = 8,
    progress: bool = True,
    cache_device=None,
) -> dict[str, Any]:
    """All ``layers`` frozen together vs the original: mean KL and top-1 next-token agreement."""
    total_kl, agree = 0.0, 0
    bar = progress_bar(len(calib.samples), "checking fidelity", progress, unit="sample")
    for samples in _batches(calib, batch_size):
        batch = _Batch(model, processor, samples, cache_device)
        log_p = batch.run_from(min(layers), batch.visual, set(layers))
        total_kl += float(kl(log_p, batch.log_probs).double().sum())
        agree += int((log_p.argmax(-1) == batch.log_probs.argmax(-1).to(log_p.device)).sum())
        bar.update(len(samples))
    bar.close()
    n = len(calib.samples)
    return {"layers": list(layers), "mean_kl": total_kl / n, "top1_agreement": agree / n, "samples": n}


def pruned_fidelity(
    model, processor, calib: CalibrationSet, layers: list[int], prune: dict, *, batch_size: int = 8, progress=True
) -> dict[str, Any]:
    """``fidelity`` of ShortV ``layers`` with token pruning ``prune`` (FastV / VTW): the ShortV model, built over
    ``model``'s own weights (no second copy), against ``model`` on the same left-padded batches."""
    from .models import SUPPORTED, shortv_config_dict

    classes = SUPPORTED[model.config.model_type]
    config_dict = shortv_config_dict(model.config.to_dict(), layers, prune)
    config = classes.config_cls.from_dict({k: v for k, v in config_dict.items() if k != "auto_map"})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        shortv = classes.model_cls(config)
    shortv.load_state_dict(model.state_dict(), assign=True)
    buffers = dict(model.named_buffers())  # the non-persistent ones (RoPE frequencies) are not in the state dict
    for name, buffer in list(shortv.named_buffers()):
        if buffer.is_meta:
            owner, _, attr = name.rpartition(".")
            shortv.get_submodule(owner)._buffers[attr] = buffers[name]
    shortv.eval()
    device = next(model.parameters()).device
    total_kl, agree = 0.0, 0
    bar = progress_bar(len(calib.samples), "checking fidelity", progress, unit="sample")
    for samples in _batches(calib, batch_size):
        inputs = {k: v.to(device) for k, v in prompt_batch(processor, samples).items()}
        with torch.no_grad():
            base = torch.log_softmax(model(**inputs).logits[:, -1].float(), -1)
            mine = torch.log_softmax(shortv(**inputs).logits[:, -1].float(), -1)
        total_kl += float(kl(mine, base).double().sum())
        agree += int((mine.argmax(-1) == base.argmax(-1)).sum())
        bar.update(len(samples))
    bar.close()
    n = len(calib.samples)
    return {"layers": list(layers), "prune": prune, "mean_kl": total_kl / n, "top1_agreement": agree / n, "samples": n}


def lc_plot_png(lc: LCResult, path: Path, title: str = "") -> bool:
    """Plot visual (and text) LC per layer to ``path``; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    layers = list(range(len(lc.visual)))
    ax.plot(layers, lc.visual, marker="o", label="visual tokens")
    if lc.text is not None:
        ax.plot(layers, lc.text, marker="s", label="text tokens")
    if lc.fidelity:
        for i in lc.fidelity["layers"]:
            ax.axvspan(i - 0.4, i + 0.4, color="0.85", zorder=0)
    ax.set_yscale("symlog", linthresh=max(min(v for v in lc.visual if v > 0) if any(lc.visual) else 1e-6, 1e-9))
    ax.set_xlabel("decoder layer (shaded: frozen)")
    ax.set_ylabel("LC = KL(P_l || P_orig)")
    ax.set_title(title or "Layer Contribution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True
