"""The `shortv-export` command: a thin layer over one library function per stage."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from .card import base_license, model_card
from .errors import ShortVError
from .flops import flops_summary
from .load import Source, resolve_model
from .publish import check_push_options
from .select import check_n, default_n, parse_layers, smallest_n_for_flops
from .write import check_output, plan_files, write_checkpoint

DEFAULT_TEXT_TOKENS = 64


def default_visual_tokens(source: Source) -> int:
    """Visual tokens of one typical image: LLaVA-1.5's fixed count, LLaVA-NeXT's 672x672 anyres (2880)."""
    if source.kind == "llava_next":
        return 2880
    return int(source.config.get("image_seq_length", 576))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model")
@click.option("--n", "n", type=int, help="Freeze the N lowest-LC layers [default: 60% of the layers].")
@click.option(
    "--target-flops",
    type=float,
    metavar="R",
    help="Freeze the fewest layers whose prefill FLOPs ratio is <= R (at the calibration set's tokens).",
)
@click.option(
    "--layers",
    "layers_spec",
    metavar="IDS|paper",
    help="Frozen layers, lowest LC first (e.g. 31,29,30), or 'paper'; skips calibration.",
)
@click.option("--out", type=click.Path(path_type=Path), help="Output folder [default: ./<model>-shortv-n<N>].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--calib", help="Calibration set: FILE.jsonl, an image folder or hf:NAME[:split] [default: embedded].")
@click.option("--samples", type=int, help="Use K samples of the calibration set (seeded choice) [default: all].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --samples.")
@click.option("--image-column", default="image", show_default=True, help="Image column for --calib hf:...")
@click.option("--prompt-column", help="Prompt column for --calib hf:... [default: caption prompt].")
@click.option(
    "--modality",
    type=click.Choice(["visual", "both"]),
    default="visual",
    show_default=True,
    help="'both' also measures text-token LC (the paper's contrast).",
)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration batch size.")
@click.option("--device", help="cpu, cuda, cuda:1 ... [default: cuda if available].")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Calibration dtype (auto: fp32 on CPU, bf16 on GPU).",
)
@click.option("--device-map", type=click.Choice(["auto"]), help="Spread a model larger than one GPU.")
@click.option("--onnx", "onnx", is_flag=True, help="Also export ONNX graphs to OUT/onnx/ and validate them.")
@click.option(
    "--onnx-dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="ONNX weight dtype."
)
@click.option("--model-revision", help="Hub revision of MODEL (branch, tag or commit).")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Reload the written folder in a fresh process, as a user would, and check it (always before --push).",
)
@click.option("--push", is_flag=True, help="Upload the folder to the Hub (token: HF_TOKEN or `hf auth login`).")
@click.option("--repo-id", help="Hub repo to push to [default: <your user>/<output folder name>].")
@click.option("--private", is_flag=True, help="Create the Hub repo as private.")
@click.option("--revision", help="Branch to push to (created if missing) [default: main].")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", help="Commit message for --push.")
@click.option("--dry-run", is_flag=True, help="Print the plan, the FLOPs ratio and the files; write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; print only the result.")
def main(model, **options):
    """Convert MODEL (a llava-hf Hub id or a local folder) into a standalone ShortV checkpoint."""
    try:
        run(model, **options)
    except ShortVError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted; nothing was written.", err=True)
        sys.exit(130)


def run(
    model,
    *,
    n,
    target_flops,
    layers_spec,
    out,
    overwrite,
    model_revision,
    dry_run,
    quiet,
    onnx,
    onnx_dtype,
    verify,
    push,
    repo_id,
    private,
    revision,
    create_pr,
    commit_message,
    **calibration,
):
    """The pipeline. ``calibration``: the calibration options (calib, samples, seed, image_column, prompt_column,
    modality, batch_size, device, dtype, device_map), handed to `_calibrate` as they are."""
    from .calibrate import LCResult

    say = (lambda *a, **k: None) if quiet else click.echo
    if quiet:  # the libraries' own bars (weights loading, uploads) too
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils.logging import disable_progress_bar

        disable_progress_bars()
        disable_progress_bar()
    if (repo_id or private or revision or create_pr or commit_message) and not push:
        raise ShortVError("--repo-id/--private/--revision/--create-pr/--commit-message only apply with --push")
    check_push_options(revision, create_pr)  # before any long work
    source = resolve_model(model, revision=model_revision, config_only=dry_run)
    total = source.num_layers
    if layers_spec is not None and (n is not None or target_flops is not None):
        raise ShortVError("--layers gives the layers itself; drop --n / --target-flops")
    if n is not None and target_flops is not None:
        raise ShortVError("give --n or --target-flops, not both")
    if n is not None:
        check_n(n, total)
    if calibration["batch_size"] < 1:
        raise ShortVError(f"--batch-size {calibration['batch_size']}: must be at least 1")
    say(f"{source.model_id}: {source.kind}, {total} decoder layers")

    lc: LCResult | None = None
    if layers_spec is not None:
        layers = parse_layers(layers_spec, total, source.model_id, source.name)
    else:
        n_planned = n if n is not None else None if target_flops is not None else default_n(total)
        if out is None and n_planned is not None:
            out = Path(f"{source.name}-shortv-n{n_planned}")
        if out is not None:
            check_output(out, overwrite, source)
        if dry_run:
            rule = f"the {n_planned} lowest-LC layers" if n_planned else f"the fewest layers for FLOPs<={target_flops}"
            say(f"would calibrate LC on {calibration['calib'] or 'the embedded set'} and freeze {rule}")
            if out is not None:
                say(f"would write {out}/ (config, modeling files, weights, lc.json, lc.png, README.md)")
            if onnx:
                say(f"would export ONNX graphs ({onnx_dtype}) to {out or '<out>'}/onnx/")
            return
        lc = _calibrate(source, out, quiet=quiet, n=n_planned, target_flops=target_flops, **calibration)
        layers = lc.fidelity["layers"]
        say(f"LC order (lowest first): {lc.order}")
        say(
            f"all {len(layers)} frozen together: mean KL {lc.fidelity['mean_kl']:.4g}, "
            f"top-1 agreement {lc.fidelity['top1_agreement']:.1%} on {lc.fidelity['samples']} samples"
        )

    out = out or Path(f"{source.name}-shortv-n{len(layers)}")
    check_output(out, overwrite, source)
    n_visual = round(lc.calibration["n_visual_mean"]) if lc else default_visual_tokens(source)
    n_text = round(lc.calibration["n_text_mean"]) if lc else DEFAULT_TEXT_TOKENS
    flops = flops_summary(source.hf_config.text_config, n_visual, n_text, layers)
    args = (
        ["--layers", ",".join(map(str, layers))]
        if lc is None
        else _calib_args(n=len(layers), target_flops=target_flops, **calibration)
    )
    command = shlex.join(["shortv-export", model, *args])
    extra = {}
    if lc is not None:
        extra["lc.json"] = lc.to_json().encode()
    license = base_license(source)

    def card(repo: str, verification: dict | None = None) -> bytes:
        fidelity = lc.fidelity if lc else None
        return model_card(
            source, layers, flops, command, fidelity, lc is not None, license, repo, verification, onnx
        ).encode()

    extra["README.md"] = card(str(out))

    say(f"frozen for visual tokens: {len(layers)} layers {layers}")
    say(
        f"prefill FLOPs at {flops['n_visual']} visual + {flops['n_text']} text tokens: "
        f"{_tflops(flops['vanilla_tflops'])} -> {_tflops(flops['shortv_tflops'])} "
        f"(ratio {flops['ratio']:.3f}, ideal speed-up {flops['ideal_speedup']:.2f}x)"
    )
    if dry_run:
        say(f"would write {out}/:")
        for f in plan_files(source, extra):
            size = f"{f.size:,} B" if f.size is not None else "-"
            say(f"  {f.name:<40} {size:>16}  {f.how}")
        if onnx:
            say(f"  {'onnx/':<40} {'-':>16}  export ({onnx_dtype})")
        return
    if lc is not None:
        extra.update(_plot(lc, source.name))
    progress = None if quiet else _progress("writing")
    finalize = (lambda folder: _export_onnx(folder, onnx_dtype, say, quiet)) if onnx else None
    path = write_checkpoint(source, layers, out, overwrite=overwrite, extra=extra, progress=progress, finalize=finalize)
    click.echo(f"wrote {path}")
    if not (verify or push):
        return
    from .publish import Publisher
    from .verify import verify_folder

    # Token and offline mode are checked before the (slower) verification.
    publisher = (
        Publisher(path, repo_id=repo_id, private=private, revision=revision, create_pr=create_pr) if push else None
    )
    say("verifying: reloading the folder in a fresh process with transformers alone")
    try:
        figures = verify_folder(path, source.path, layers)
    except ShortVError as err:
        raise ShortVError(f"{err}. {path} is written but was not pushed" if push else str(err)) from None
    say(
        f"verified: reloaded {figures['class']} matches the in-process model (max |logits diff| "
        f"{figures['max_abs_logits_diff_vs_in_process']:.2e}); vs base: mean KL {figures['mean_kl_vs_base']:.4g}, "
        f"top-1 agreement {figures['top1_agreement_vs_base']:.0%} on {figures['samples']} prompts; greedy tokens "
        "with the cache equal those without it"
    )
    if not push:
        _replace(path / "README.md", card(str(path), figures))
        return
    repo = publisher.resolve_repo_id()
    _replace(path / "README.md", card(repo, figures))
    say(f"pushing {path} to {repo}" + (f" ({revision})" if revision else ""))
    result = publisher.push(commit_message)
    if result.uploaded:
        click.echo(f"pushed: {result.url}")
    else:
        click.echo(f"{result.repo_id} already holds these files: nothing to upload")


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _export_onnx(folder: Path, dtype: str, say, quiet: bool) -> None:
    from .onnx_export import export_onnx

    report = export_onnx(folder, dtype=dtype, progress=not quiet)
    v = report.validation
    say(
        f"ONNX Runtime vs PyTorch on {v['samples']} sample prompts: max |logits diff| {v['max_abs_logits_diff']:.2e} "
        f"(tolerance {v['tolerance']:.2e}), max |hidden diff| {v['max_abs_hidden_diff']:.2e}, "
        f"top-1 {'agrees' if v['top1_agree'] else 'differs'}"
    )


def _calibrate(
    source,
    out,
    *,
    calib,
    samples,
    seed,
    image_column,
    prompt_column,
    modality,
    batch_size,
    device,
    dtype,
    device_map,
    quiet,
    n,
    target_flops,
):
    """LC (reused from out/lc.json when it matches), the selected layers and their fidelity, as one LCResult."""
    from .calibrate import calibrate, calibration_key, fidelity, load_model, resolve_dtype, reusable
    from .data import load_calibration
    from .select import lowest

    say = (lambda *a, **k: None) if quiet else click.echo
    calib_set = load_calibration(
        calib, samples=samples, seed=seed, image_column=image_column, prompt_column=prompt_column
    )
    for sample in calib_set.samples:  # fail on a missing or broken image before loading the model
        sample.load_image()
    model = processor = None
    key = calibration_key(source, calib_set, modality, resolve_dtype(dtype, device, device_map))
    lc = reusable(out / "lc.json", key) if out is not None else None
    if lc is not None and (modality == "visual" or lc.text is not None):
        say(f"reusing LC from {out / 'lc.json'} (same model and calibration set)")
    else:
        say(f"calibrating LC on {len(calib_set.samples)} samples of {calib_set.name}")
        model, processor = load_model(source, device=device, dtype=dtype, device_map=device_map)
        lc = calibrate(
            model, processor, calib_set, modality=modality, batch_size=batch_size, progress=not quiet, key=key
        )
    if target_flops is not None:
        n = smallest_n_for_flops(
            source.hf_config.text_config,
            lc.order,
            target_flops,
            lc.calibration["n_visual_mean"],
            lc.calibration["n_text_mean"],
        )
        if n == 0:
            raise ShortVError(f"--target-flops {target_flops}: already met with no frozen layer")
    layers = lowest(lc.order, n)
    if lc.fidelity is None or lc.fidelity["layers"] != layers:
        if model is None:
            model, processor = load_model(source, device=device, dtype=dtype, device_map=device_map)
        lc.fidelity = fidelity(model, processor, calib_set, layers, batch_size=batch_size, progress=not quiet)
    return lc


def _calib_args(*, calib, samples, seed, modality, n, target_flops, **_) -> list[str]:
    args = ["--target-flops", str(target_flops)] if target_flops is not None else ["--n", str(n)]
    if calib:
        args += ["--calib", calib]
    if samples:
        args += ["--samples", str(samples), "--seed", str(seed)]
    if modality != "visual":
        args += ["--modality", modality]
    return args


def _plot(lc, name) -> dict[str, bytes]:
    import tempfile

    from .calibrate import lc_plot_png

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lc.png"
        if lc_plot_png(lc, path, title=f"{name}: Layer Contribution"):
            return {"lc.png": path.read_bytes()}
    return {}


def _tflops(t: float) -> str:
    return f"{t:.2f} TFLOPs" if t >= 0.01 else f"{t * 1e3:.3g} GFLOPs"


def _progress(desc):
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=desc, unit="file")


if __name__ == "__main__":
    main()
