"""The pipeline as one library call: ``convert(model, ...)`` runs the stages once each, in order (load,
calibrate or reuse, select, write with its model card, export, verify, publish), handing each a plain result,
and returns a ``ConvertResult``. The ``shortv-export`` command parses its options, calls this, and prints.

    from shortv_export import convert
    result = convert("llava-hf/llava-1.5-7b-hf", n=19, out="llava7b-shortv")
    result.layers, result.flops["ratio"], result.verification["mean_kl_vs_base"]
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ShortVError, WrittenButInterrupted
from .families import FAMILIES, onnx_families
from .figures import Fidelity, Flops, OnnxValidation, Quantization, Verification

_HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")  # what the card's YAML may name as base_model
DEFAULT_TEXT_TOKENS = 64  # the text of a typical prompt, for FLOPs when no calibration set was run
MIN_AGREEMENT = 0.9


@dataclass
class CalibrationOptions:
    """How LC is measured (the CLI's --calib ... --device-map), and the fidelity floor ``min_agreement``: below
    it the run warns and names the largest N that stays above it."""

    calib: str | None = None  # None: the embedded set; FILE.jsonl, an image folder, or hf:NAME[:split]
    samples: int | None = None
    seed: int = 0
    image_column: str = "image"
    prompt_column: str | None = None
    modality: str = "visual"  # or "both": also text-token LC
    batch_size: int = 8
    device: str | None = None
    dtype: str = "auto"
    device_map: str | None = None
    min_agreement: float = MIN_AGREEMENT
    threads: int | None = None  # CPU threads for calibration and verification (None: PyTorch's default)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ShortVError(f"--batch-size {self.batch_size}: must be at least 1")
        if not 0 <= self.min_agreement <= 1:
            raise ShortVError(f"--min-agreement {self.min_agreement}: must be a share in [0, 1]")
        if self.threads is not None and self.threads < 1:
            raise ShortVError(f"--threads {self.threads}: must be at least 1")


@dataclass(frozen=True)
class ExportOptions:
    """``--onnx`` and its settings."""

    enabled: bool = False
    dtype: str = "fp32"
    quantize: str | None = None  # int4 or int8: weight-only quantization of the decoder

    def __post_init__(self):
        if self.quantize is not None and not self.enabled:
            raise ShortVError("--onnx-quantize applies to the ONNX export: add --onnx")
        if self.quantize not in (None, "int4", "int8"):
            raise ShortVError(f"--onnx-quantize {self.quantize}: choose int4 or int8")


@dataclass(frozen=True)
class PushOptions:
    """``--push`` and where to."""

    enabled: bool = False
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None

    def __post_init__(self):
        from .publish import check_push_options

        if (
            self.repo_id or self.private or self.revision or self.create_pr or self.commit_message
        ) and not self.enabled:
            raise ShortVError("--repo-id/--private/--revision/--create-pr/--commit-message only apply with --push")
        check_push_options(self.revision, self.create_pr)


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``convert`` is asked beyond the model and calibration, checked once when made."""

    n: int | None = None
    layers: str | list[int] | None = None
    target_flops: float | None = None
    out: Path | None = None
    overwrite: bool = False
    export: ExportOptions = field(default_factory=ExportOptions)
    verify: bool = True
    push: PushOptions = field(default_factory=PushOptions)
    model_revision: str | None = None
    base_model: str | None = None
    dry_run: bool = False
    progress: bool = True
    prune: dict | None = None  # token pruning (FastV / VTW): the config's shortv_prune, from --fastv / --vtw

    def __post_init__(self):
        if self.out is not None and not isinstance(self.out, Path):
            object.__setattr__(self, "out", Path(self.out))
        if self.layers is not None and (self.n is not None or self.target_flops is not None):
            raise ShortVError("--layers gives the layers itself; drop --n / --target-flops")
        if self.n is not None and self.target_flops is not None:
            raise ShortVError("give --n or --target-flops, not both")
        if self.target_flops is not None and not 0 < self.target_flops <= 1:
            raise ShortVError(f"--target-flops {self.target_flops}: must be a ratio in (0, 1]")
        if self.base_model is not None and not _HUB_ID.fullmatch(self.base_model):
            raise ShortVError(f"--base-model {self.base_model!r}: not a Hub repo id (owner/name)")


@dataclass
class ConvertResult:
    """What a conversion produced (or, with ``dry_run``, would produce)."""

    model_id: str
    kind: str  # the base model_type: llava, llava_next, qwen2_5_vl, ... (families.FAMILIES)
    num_layers: int
    n: int  # layers frozen
    layers: list[int] | None  # frozen layers, lowest LC first (None in a dry run that would calibrate)
    flops: Flops  # vanilla vs ShortV prefill FLOPs, and what the token counts are
    command: str  # the shortv-export command that reproduces it
    out: Path | None = None
    files: list = field(default_factory=list)  # write.PlannedFile of the output folder
    lc: Any = None  # calibrate.LCResult, with .fidelity, when the layers were calibrated
    onnx: OnnxValidation | None = None  # the export's validation figures
    onnx_quantization: Quantization | None = None  # what --onnx-quantize did, and its agreement
    verification: Verification | None = None
    pushed: Any = None  # publish.PushResult
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False
    prune: dict | None = None  # token pruning written with the layers (the config's shortv_prune)


@dataclass(frozen=True)
class Plan:
    """What the plan stage settled before any long work: the source, the layers given (or how many calibration
    will pick), the output folder, and the token counts a dry run or --target-flops measured."""

    model: str  # what the reproduce command names: --base-model, the Hub id, or the local folder's name
    source: Any  # load.Source
    layers: list[int] | None  # given with --layers; None: calibration picks ``n``
    n: int
    out: Path
    counts: tuple | None = None  # (mean visual tokens, mean text tokens, the calibration set)


def convert(
    model: str,
    *,
    n: int | None = None,
    layers: str | list[int] | None = None,
    target_flops: float | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    calibration: CalibrationOptions | None = None,
    onnx: bool = False,
    onnx_dtype: str = "fp32",
    onnx_quantize: str | None = None,
    verify: bool = True,
    push: bool = False,
    repo_id: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    model_revision: str | None = None,
    base_model: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    fastv: str | None = None,
    vtw: int | None = None,
) -> ConvertResult:
    """Convert ``model`` (a Hub id or a local folder) into a standalone ShortV checkpoint.

        Layers: ``layers`` (ids, lowest LC first, as a list or "31,29,30", or "paper"), else the ``n`` lowest-LC
        layers (default 60%), or the fewest whose FLOPs ratio is <= ``target_flops``. ``base_model``: the Hub id
        the card names when ``model`` is a local folder. ``fastv`` ("K:R", e.g. "2:0.5") or ``vtw`` (K): token pruning
    written with the layers (docs/method.md section 5). ``log`` receives one line per step (default: print when
        ``progress``). Raises ShortVError on anything the user can fix; nothing is left half-written.
    """
    export = ExportOptions(onnx, onnx_dtype, onnx_quantize)
    publish = PushOptions(push, repo_id, private, revision, create_pr, commit_message)
    options = ConvertOptions(  # positional, in field order: each dataclass is made (and checked) once
        n,
        layers,
        target_flops,
        out,
        overwrite,
        export,
        verify,
        publish,
        model_revision,
        base_model,
        dry_run,
        progress,
        parse_prune(fastv, vtw),
    )
    calibration = calibration or CalibrationOptions()
    say = log or (print if progress else _silent)
    warnings = _check_environment(options, calibration)
    plan = plan_stage(model, options, calibration, say)
    if options.dry_run:
        return dry_run_stage(plan, options, calibration, say, warnings)
    publisher = _publisher(plan.out, options.push)  # offline mode, the token and the endpoint, before long work
    layers, lc = select_stage(plan, calibration, options.progress, say, options.prune)
    result = _result(plan, layers, lc, options, calibration, warnings, say)
    result = write_stage(plan.source, result, options, calibration, say)
    if not (options.verify or publisher):
        return result
    try:
        if publisher:
            publisher.written_to(result.out)
        result = verify_stage(plan.source, result, options, calibration, publisher, say)
        return publish_stage(result, publisher, options.push, say)
    except KeyboardInterrupt:
        raise WrittenButInterrupted(result.out) from None


def parse_prune(fastv: str | None, vtw: int | None) -> dict | None:
    """The config's ``shortv_prune`` for ``--fastv K:R`` or ``--vtw K`` (checked against the model in the plan)."""
    if fastv is not None and vtw is not None:
        raise ShortVError("give --fastv or --vtw, not both")
    if vtw is not None:
        return {"method": "vtw", "layer": vtw}
    if fastv is None:
        return None
    match = re.fullmatch(r"(\d+):(0?\.\d+|1(?:\.0*)?|0)", str(fastv).strip())
    if not match:
        raise ShortVError(f"--fastv {fastv!r}: give K:R, the first pruned layer and the share removed (e.g. 2:0.5)")
    return {"method": "fastv", "layer": int(match[1]), "ratio": float(match[2])}


def _check_prune(prune: dict, source, onnx: bool) -> None:
    """What token pruning needs of the model: K in range, full attention from layer K-1 on, a family whose ONNX
    export prunes tokens with --onnx."""
    from .modeling.configuration_shortv import check_prune
    from .modeling.modeling_shortv import attention_types

    flag = "--fastv" if prune["method"] == "fastv" else "--vtw"
    try:
        check_prune(prune, source.num_layers)
    except ValueError as err:
        raise ShortVError(f"{flag}: {err}") from None
    first = prune["layer"] - (prune["method"] == "fastv")
    sliding = [
        i for i, t in enumerate(attention_types(source.hf_config.text_config)) if i >= first and t != "full_attention"
    ]
    if sliding:
        raise ShortVError(
            f"{flag}: layers {sliding} of {source.model_id} attend in a sliding window; token pruning supports "
            f"text models with full attention from layer {first} on"
        )
    if onnx and not FAMILIES[source.kind].onnx_prune:
        supported = ", ".join(f.display for f in FAMILIES.values() if f.onnx_prune)
        raise ShortVError(
            f"--onnx with {flag}: the ONNX export prunes tokens for {supported}, not {FAMILIES[source.kind].display}; "
            "drop one of them"
        )


def _check_environment(options: ConvertOptions, calibration: CalibrationOptions) -> list[str]:
    """What the options need of this machine (the device, the ONNX packages), checked before any long work; the
    warnings a dry run reports instead of failing."""
    export = options.export
    _check_device(calibration.device, export.enabled and not options.dry_run)
    missing = _missing_onnx_modules() if export.enabled else []
    if missing and not options.dry_run:
        raise ShortVError(f"--onnx needs {', '.join(missing)}: pip install 'shortv-export[onnx]' (or [gpu])")
    if not options.progress:
        _quiet_libraries()
    if calibration.threads is not None:
        import torch

        torch.set_num_threads(calibration.threads)
    return [f"--onnx needs {', '.join(missing)}: pip install 'shortv-export[onnx]'"] if missing else []


def plan_stage(model: str, options: ConvertOptions, calibration: CalibrationOptions, say) -> Plan:
    """Stage 1, load, and the plan: resolve MODEL, check what it supports, settle the layers given or how many
    calibration will pick, and check the output folder, all before any long work."""
    from .load import resolve_model
    from .select import check_n, default_n, parse_layers
    from .write import check_output

    source = resolve_model(model, revision=options.model_revision, config_only=options.dry_run)
    total = source.num_layers
    say(f"{source.model_id}: {source.kind}, {total} decoder layers")
    if options.export.enabled and source.kind not in ONNX_FAMILIES:
        raise ShortVError(
            f"--onnx exports {', '.join(ONNX_FAMILIES)} checkpoints so far, not {source.kind}; convert without "
            "--onnx (the checkpoint itself supports it)"
        )
    if options.n is not None:
        check_n(options.n, total)
    if options.prune:
        _check_prune(options.prune, source, options.export.enabled)
    layers, counts = options.layers, None
    if layers is not None:
        spec = layers if isinstance(layers, str) else ",".join(map(str, layers))
        layers = parse_layers(spec, total, source.model_id, source.name)
        planned = len(layers)
    else:
        if options.target_flops is not None or options.dry_run:  # token counts from the processor alone
            counts = _token_counts(source, calibration)
        planned = options.n if options.n is not None else default_n(total)
        if options.target_flops is not None:
            planned = _n_for_target(source, options.target_flops, *counts[:2], options.prune)
    out = options.out or Path(f"{source.name}-shortv-n{planned}")
    check_output(out, options.overwrite, source)  # before the (long) calibration
    return Plan(options.base_model or source.repo_id or source.name, source, layers, planned, out, counts)


def select_stage(
    plan: Plan, calibration: CalibrationOptions, progress: bool, say, prune: dict | None = None
) -> tuple[list[int], Any]:
    """Stages 2 and 3, calibrate (or reuse lc.json) and select: the frozen layers and the LCResult (None when
    the layers were given)."""
    if plan.layers is not None:
        return plan.layers, None
    lc = _calibrate(plan.source, plan.out, calibration, plan.n, progress, say, prune)
    say(f"LC order (lowest first): {lc.order}")
    say(Fidelity.of(lc.fidelity).log_line())
    return lc.fidelity["layers"], lc


def _result(plan, layers, lc, options, calibration, warnings, say) -> ConvertResult:
    """The result as selected, before anything is written."""
    source = plan.source
    warning = Fidelity.of(lc.fidelity).warning() if lc is not None else None
    flops = _flops(source, layers, lc, options.prune)
    result = ConvertResult(
        source.model_id,
        source.kind,
        source.num_layers,
        len(layers),
        layers,
        flops,
        _command(layers, lc is not None, len(layers), calibration, options, plan),
        out=plan.out,
        lc=lc,
        warnings=[*warnings, *([warning] if warning else [])],
        prune=options.prune,
    )
    say(f"frozen for visual tokens: {result.n} layer{'s' * (result.n != 1)} {result.layers}")
    if options.prune:
        say(f"token pruning: {prune_description(options.prune)}")
    say(result.flops.log_line())
    return result


def write_stage(source, result: ConvertResult, options: ConvertOptions, calibration, say) -> ConvertResult:
    """Stages 4 and 5, write and export: the folder with its card, and the ONNX graphs inside the atomic write (a
    failed export leaves nothing), the card then rewritten with their figures."""
    from .write import plan_files, write_checkpoint

    extra = _extra_files(source, result, options)
    result = replace(result, files=plan_files(source, extra))
    exported: dict[str, Any] = {}

    def export(folder: Path) -> None:
        exported.update(_export(folder, options, calibration, say))
        card = _card(source, replace(result, out=folder, **exported), options, repo=result.out.name)
        (folder / "README.md").write_bytes(card.encode())

    out = write_checkpoint(
        source,
        result.layers,
        result.out,
        prune=result.prune,
        overwrite=options.overwrite,
        extra=extra,
        progress=_progress("writing") if options.progress else None,
        finalize=export if options.export.enabled else None,
    )
    say(f"wrote {out}")
    return replace(
        result, out=out, **exported, warnings=result.warnings + _quantization_warnings(exported, calibration)
    )


def verify_stage(source, result: ConvertResult, options: ConvertOptions, calibration, publisher, say) -> ConvertResult:
    """Stage 6, verify: reload the folder in a fresh process; its figures go into the card (which names the Hub
    repo the ``publisher`` will push to)."""
    from .verify import verify_folder

    say("verifying: reloading the folder in a fresh process with transformers alone")
    try:
        v = verify_folder(
            result.out,
            source.path,
            result.layers,
            device=calibration.device,
            dtype=calibration.dtype,
            threads=calibration.threads,
            prune=result.prune,
        )
    except ShortVError as err:
        raise ShortVError(f"{err}. {result.out} is written but was not pushed" if publisher else str(err)) from None
    v = Verification.of(v)
    say(v.log_line())
    result = replace(result, verification=v)
    repo = publisher.resolve_repo_id() if publisher is not None else None
    _replace(result.out / "README.md", _card(source, result, options, repo).encode())
    return result


def publish_stage(result: ConvertResult, publisher, push: PushOptions, say) -> ConvertResult:
    """Stage 7, publish: upload the verified folder."""
    if publisher is None:
        return result
    say(f"pushing {result.out} to {publisher.resolve_repo_id()}" + (f" ({push.revision})" if push.revision else ""))
    return replace(result, pushed=publisher.push(push.commit_message))


def _publisher(folder: Path, push: PushOptions):
    """The Publisher of a --push, its offline mode, token and endpoint checked, or None."""
    from .publish import Publisher

    if not push.enabled:
        return None
    publisher = Publisher(
        folder,
        repo_id=push.repo_id,
        private=push.private,
        revision=push.revision,
        create_pr=push.create_pr,
        written=False,
    )
    publisher.check()
    return publisher


def dry_run_stage(plan: Plan, options: ConvertOptions, calibration, say, warnings) -> ConvertResult:
    """A dry run: the layers (given, or the N that would be calibrated), the FLOPs (at the calibration set's token
    counts, counted with the processor alone: no model is loaded) and the files."""
    from .write import plan_files

    source = plan.source
    if plan.layers is not None:
        result = _result(plan, plan.layers, None, options, calibration, warnings, say)
        files = plan_files(source, _extra_files(source, result, options, dry_run=True))
    else:
        n_visual, n_text, calib = plan.counts
        # every decoder layer has the same shape: any N layers cost the same, whichever LC picks
        flops = _flops_at(
            source.hf_config.text_config, n_visual, n_text, list(range(plan.n)), "calibration set mean", options.prune
        )
        result = ConvertResult(
            source.model_id,
            source.kind,
            source.num_layers,
            plan.n,
            None,
            flops,
            _command(None, True, plan.n, calibration, options, plan),
            out=plan.out,
            warnings=warnings,
            prune=options.prune,
        )
        target = options.target_flops
        rule = f"the {plan.n} lowest-LC layers" + (f" (FLOPs ratio <= {target})" if target else "")
        say(f"would calibrate LC on {len(calib.samples)} samples of {_set_description(calib.name)} and freeze {rule}")
        say(result.flops.log_line())
        files = plan_files(source, dict.fromkeys(("README.md", "lc.json", "lc.png")))
    export = options.export
    if export.enabled:
        quantized = f", decoder quantized to {export.quantize}" if export.quantize else ""
        say(f"would export ONNX graphs ({export.dtype}{quantized}) to {result.out}/onnx/")
    return replace(result, files=files, dry_run=True)


def _extra_files(source, result: ConvertResult, options: ConvertOptions, dry_run: bool = False) -> dict:
    """The generated files beside the weights (name -> content; None in a dry run): lc.json and its plot when
    calibrated, and the model card."""
    extra: dict[str, bytes | None] = {}
    if result.lc is not None:
        extra["lc.json"] = result.lc.to_json().encode()
        extra.update({"lc.png": None} if dry_run else _plot(result.lc, source.name))
    card = None if dry_run else _card(source, result, options, has_plot="lc.png" in extra).encode()
    return {**extra, "README.md": card}


def _export(folder: Path, options: ConvertOptions, calibration: CalibrationOptions, say) -> dict[str, Any]:
    """The ONNX export of ``folder`` and its figures (``onnx``, ``onnx_quantization``), logged."""
    from .onnx_export import export_onnx

    export = options.export
    report = export_onnx(
        folder, dtype=export.dtype, progress=options.progress, quantize=export.quantize, device=calibration.device
    )
    v, q = OnnxValidation.of(report.validation), Quantization.of(report.quantization)
    say(v.log_line())
    if q:
        say(q.log_line())
    return {"onnx": v, "onnx_quantization": q}


def _quantization_warnings(exported: dict[str, Any], calibration: CalibrationOptions) -> list[str]:
    q = exported.get("onnx_quantization")
    warning = q.warning(calibration.min_agreement) if q else None
    return [warning] if warning else []


def _silent(*_args, **_kwargs) -> None:
    pass


def _quiet_libraries() -> None:
    """No progress bars from transformers (weights loading) or huggingface_hub (downloads, uploads) either."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bars()
    disable_progress_bar()


ONNX_FAMILIES = onnx_families()  # what --onnx exports


def _check_device(device: str | None, onnx: bool) -> None:
    """``--device``: a device torch knows and this machine has (and, for the ONNX check on CUDA, onnxruntime-gpu)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ShortVError(f"--device {device}: not a device torch knows (cpu, cuda, cuda:1, mps ...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ShortVError(f"--device {device}: this torch sees no CUDA GPU (torch {torch.__version__})")
    if kind == "cuda" and onnx:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise ShortVError(
                "--onnx with --device cuda checks the graphs with ONNX Runtime's CUDA provider: "
                "pip install 'shortv-export[gpu]' (onnxruntime-gpu)"
            )


def _missing_onnx_modules() -> list[str]:
    import importlib.util

    return [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


def _set_description(name: str) -> str:
    return "the embedded set (real photographs, 20 questions + 20 caption prompts)" if name == "default" else name


def _token_counts(source, c: CalibrationOptions) -> tuple[float, float, Any]:
    """Mean visual and text tokens per calibration prompt, counted with the processor alone, and the set."""
    from .data import load_calibration, token_counts
    from .load import load_processor

    calib = load_calibration(
        c.calib, samples=c.samples, seed=c.seed, image_column=c.image_column, prompt_column=c.prompt_column
    )
    return (*token_counts(load_processor(source.path), calib, source.hf_config.image_token_id), calib)


def _n_for_target(source, target_flops: float, n_visual: float, n_text: float, prune: dict | None = None) -> int:
    """``--target-flops``: the fewest frozen layers that reach it (every layer costs the same, so this is known
    before calibration picks which)."""
    from .select import smallest_n_for_flops

    n = smallest_n_for_flops(
        source.hf_config.text_config, list(range(source.num_layers)), target_flops, n_visual, n_text, prune
    )
    if n == 0:
        raise ShortVError(
            f"--target-flops {target_flops}: already met with no frozen layer"
            + (f" ({prune_description(prune)})" if prune else "")
        )
    return n


def _calibrate(source, out, calibration: CalibrationOptions, n, progress, say, prune: dict | None = None):
    """LC (reused from out/lc.json when it matches), the selected layers and their fidelity, as one LCResult."""
    from .calibrate import calibrate, calibration_key, fidelity, load_model, pruned_fidelity, reusable
    from .data import load_calibration
    from .numerics import resolve_dtype
    from .select import lowest

    c = calibration
    calib = load_calibration(
        c.calib, samples=c.samples, seed=c.seed, image_column=c.image_column, prompt_column=c.prompt_column
    )
    for sample in calib.samples:  # fail on a missing or broken image before loading the model
        sample.load_image()
    model = processor = None
    key = calibration_key(source, calib, c.modality, resolve_dtype(c.dtype, c.device, c.device_map))
    lc = reusable(out / "lc.json", key) if out is not None else None
    if lc is not None and (c.modality == "visual" or lc.text is not None):
        say(f"reusing LC from {out / 'lc.json'} (same model and calibration set)")
    else:
        say(f"calibrating LC on {len(calib.samples)} samples of {_set_description(calib.name)}")
        model, processor = load_model(source, device=c.device, dtype=c.dtype, device_map=c.device_map)
        lc = calibrate(
            model, processor, calib, modality=c.modality, batch_size=c.batch_size, progress=progress, key=key
        )
        _check_finite(lc.visual + (lc.text or []))
    layers = lowest(lc.order, n)
    floor = c.min_agreement
    same = lc.fidelity and lc.fidelity["layers"] == layers and lc.fidelity.get("prune") == prune
    stored = lc.fidelity if same else None
    if stored is None or stored.get("min_agreement") != floor:
        if model is None:
            model, processor = load_model(source, device=c.device, dtype=c.dtype, device_map=c.device_map)

        def agreement(frozen: list[int]) -> dict:
            if prune:
                return pruned_fidelity(
                    model, processor, calib, frozen, prune, batch_size=c.batch_size, progress=progress
                )
            return fidelity(model, processor, calib, frozen, batch_size=c.batch_size, progress=progress)

        fresh = {k: v for k, v in (stored or agreement(layers)).items() if not k.startswith("largest_n")}
        lc.fidelity = dict(fresh, min_agreement=floor)
        if lc.fidelity["top1_agreement"] < floor:
            say(
                f"top-1 agreement {lc.fidelity['top1_agreement']:.1%} is below --min-agreement {floor:.0%}: "
                "looking for the largest N that stays above it"
            )
            lc.fidelity.update(_largest_n_above(lc.order, len(layers), agreement, floor, bool(prune)))
    return lc


def _check_finite(values: list[float]) -> None:
    """NaN or inf LC: the model's own outputs on the calibration set are not finite (not a ShortV problem)."""
    if not all(math.isfinite(v) for v in values):
        raise ShortVError(
            "LC is not finite (NaN or inf): the model's outputs on the calibration set are not finite; check the "
            "weights, or calibrate with --dtype fp32"
        )


def _largest_n_above(order: list[int], n_bad: int, agreement, floor: float, pruned: bool = False) -> dict[str, Any]:
    """The largest N < ``n_bad`` whose top-1 agreement is >= ``floor``, by bisection over the LC order (a few
    fidelity passes; agreement falls with N, though not strictly). N = 0 agrees fully, unless tokens are pruned."""
    good, good_share, bad = 0, agreement([])["top1_agreement"] if pruned else 1.0, n_bad
    while bad - good > 1:
        mid = (good + bad) // 2
        share = agreement(order[:mid])["top1_agreement"]
        if share >= floor:
            good, good_share = mid, share
        else:
            bad = mid
    return {"largest_n_above_min_agreement": good, "largest_n_top1_agreement": good_share}


def _flops(source, layers, lc, prune: dict | None = None) -> Flops:
    text_config = source.hf_config.text_config
    if lc is not None:
        n_visual, n_text = lc.calibration["n_visual_mean"], lc.calibration["n_text_mean"]
        return _flops_at(text_config, n_visual, n_text, layers, "calibration set mean", prune)
    visual = _default_visual_tokens(source)
    return _flops_at(text_config, visual, DEFAULT_TEXT_TOKENS, layers, "typical prompt", prune)


def _flops_at(text_config, n_visual, n_text, layers, tokens_from: str, prune: dict | None = None) -> Flops:
    from .flops import flops_summary

    summary = flops_summary(text_config, round(n_visual), round(n_text), layers, prune)
    return Flops.of(dict(summary, tokens_from=tokens_from))


def prune_description(prune: dict) -> str:
    """'FastV K=2 R=50%' / 'VTW K=16': for the log, the card and the FLOPs line."""
    if prune["method"] == "fastv":
        return f"FastV K={prune['layer']} R={prune['ratio']:.0%}"
    return f"VTW K={prune['layer']}"


def _default_visual_tokens(source) -> int:
    """Visual tokens of one typical image of the family (``families.Family.typical_visual_tokens``)."""
    return FAMILIES[source.kind].typical_visual_tokens(source.hf_config)


def _command(layers, calibrated: bool, n: int, c: CalibrationOptions, options: ConvertOptions, plan) -> str:
    """The shortv-export command that reproduces the result: its selection, every option that changes it and the
    output folder's name. It names no local path: a local source by ``--base-model`` or its folder's name, a local
    calibration set by its file's name."""
    model, out = plan.model, plan.out
    args = []
    if not calibrated:
        args += ["--layers", ",".join(map(str, layers))]
    else:
        target = options.target_flops
        args += ["--target-flops", str(target)] if target is not None else ["--n", str(n)]
        if c.calib:
            from .calibrate import public_name

            args += ["--calib", public_name(c.calib)]
            if c.calib.startswith("hf:"):
                args += ["--image-column", c.image_column]
                args += ["--prompt-column", c.prompt_column] if c.prompt_column else []
        if c.samples:
            args += ["--samples", str(c.samples), "--seed", str(c.seed)]
        if c.modality != "visual":
            args += ["--modality", c.modality]
        if c.dtype != "auto":
            args += ["--dtype", c.dtype]
        if c.min_agreement != MIN_AGREEMENT:
            args += ["--min-agreement", str(c.min_agreement)]
    prune = options.prune
    if prune:
        args += ["--fastv", f"{prune['layer']}:{prune['ratio']:g}"] if prune["method"] == "fastv" else []
        args += ["--vtw", str(prune["layer"])] if prune["method"] == "vtw" else []
    if options.model_revision:
        args += ["--model-revision", options.model_revision]
    export = options.export
    if export.enabled:
        args += ["--onnx"] + (["--onnx-dtype", export.dtype] if export.dtype != "fp32" else [])
        args += ["--onnx-quantize", export.quantize] if export.quantize else []
    return shlex.join(["shortv-export", str(model), *args, "--out", out.name])


def _card(source, result: ConvertResult, options: ConvertOptions, repo: str | None = None, has_plot=None) -> str:
    """The model card of ``result``; ``repo``: the Hub id the usage loads (default: the folder's name)."""
    from .card import base_license, model_card

    if has_plot is None:
        has_plot = any(f.name == "lc.png" for f in result.files)
    return model_card(
        source,
        result,
        repo=repo or result.out.name,
        has_plot=has_plot,
        license=base_license(source),
        onnx=options.export.enabled,
        base_model=options.base_model,
    )


def _plot(lc, name) -> dict[str, bytes]:
    import tempfile

    from .calibrate import lc_plot_png

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lc.png"
        if lc_plot_png(lc, path, title=f"{name}: Layer Contribution"):
            return {"lc.png": path.read_bytes()}
    return {}


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _progress(desc):
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=desc, unit="file")
