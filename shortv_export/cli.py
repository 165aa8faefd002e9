"""The `shortv-export` command: parses options, calls `shortv_export.convert`, prints the result.

Nothing heavy is imported at module level, so `--help` and `--version` answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import ShortVError, WrittenButInterrupted
from .pipeline import CalibrationOptions, ExportOptions

CAL, EXPORT = CalibrationOptions(), ExportOptions()  # the defaults, as the Python API has them


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="shortv-export", prog_name="shortv-export", message="%(prog)s %(version)s")
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
@click.option(
    "--fastv",
    metavar="K:R",
    help="Also prune visual tokens as FastV: from layer K on, drop the share R the last prompt token attends to "
    "least in layer K-1 (e.g. 2:0.5).",
)
@click.option("--vtw", type=int, metavar="K", help="Also prune visual tokens as VTW: drop them all from layer K on.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder [default: ./<model>-shortv-n<N>].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--calib", help="Calibration set: FILE.jsonl, an image folder or hf:NAME[:split] [default: embedded].")
@click.option("--samples", type=int, help="Use K samples of the calibration set (seeded choice) [default: all].")
@click.option("--seed", type=int, default=CAL.seed, show_default=True, help="Seed for --samples.")
@click.option("--image-column", default=CAL.image_column, show_default=True, help="Image column for --calib hf:...")
@click.option("--prompt-column", help="Prompt column for --calib hf:... [default: caption prompt].")
@click.option(
    "--modality",
    type=click.Choice(["visual", "both"]),
    default=CAL.modality,
    show_default=True,
    help="'both' also measures text-token LC (the paper's contrast).",
)
@click.option("--batch-size", type=int, default=CAL.batch_size, show_default=True, help="Calibration batch size.")
@click.option("--device", help="cpu, cuda, cuda:1 ... [default: cuda if available].")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default=CAL.dtype,
    show_default=True,
    help="Calibration dtype (auto: fp32 on CPU, bf16 on GPU).",
)
@click.option("--device-map", type=click.Choice(["auto"]), help="Spread a model larger than one GPU.")
@click.option(
    "--threads",
    type=int,
    help="CPU threads for calibration and verification [default: PyTorch's, one per core]. On cores shared with "
    "other jobs, 1 avoids a several-fold slowdown.",
)
@click.option(
    "--min-agreement",
    type=float,
    default=CAL.min_agreement,
    show_default=True,
    help="Warn when top-1 agreement with the base model on the calibration set falls below this share, naming "
    "the largest N that stays above it.",
)
@click.option("--onnx", "onnx", is_flag=True, help="Also export ONNX graphs to OUT/onnx/ and validate them.")
@click.option(
    "--onnx-dtype",
    type=click.Choice(["fp32", "fp16"]),
    default=EXPORT.dtype,
    show_default=True,
    help="ONNX weight dtype.",
)
@click.option(
    "--onnx-quantize",
    type=click.Choice(["int4", "int8"]),
    help="Weight-only quantization of the ONNX decoder (onnxruntime MatMulNBits), checked against the unquantized one.",
)
@click.option("--model-revision", help="Hub revision of MODEL (branch, tag or commit).")
@click.option("--base-model", help="Hub id of the base model, for the model card, when MODEL is a local folder.")
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
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Print only the result line (wrote OUT; pushed: URL), warnings and errors: no progress bars or stage "
    "messages (with --dry-run, the files it would write).",
)
def main(model, **options):
    """Convert MODEL (a Hub id or a local folder of a supported vision-language family) into a ShortV checkpoint.

    Families: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3, SmolVLM, Gemma 3,
    Mistral 3.
    """
    try:
        run(model, **options)
    except ShortVError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    except WrittenButInterrupted as err:  # after the write stage: say where the folder is
        click.echo(f"Interrupted: {err}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted; nothing was written.", err=True)
        sys.exit(130)


CALIBRATION = ("calib", "samples", "seed", "image_column", "prompt_column", "modality", "batch_size", "device")
CALIBRATION += ("dtype", "device_map", "min_agreement", "threads")


def run(model: str, *, quiet: bool, layers_spec: str | None, **options) -> None:
    """The command: `convert` with the options as given, then what it produced."""
    from .pipeline import convert

    calibration = CalibrationOptions(**{k: options.pop(k) for k in CALIBRATION})
    say = (lambda line: None) if quiet else click.echo
    result = convert(model, layers=layers_spec, calibration=calibration, progress=not quiet, log=say, **options)
    for warning in result.warnings:
        click.echo(f"Warning: {warning}", err=True)
    if result.dry_run:  # its result is the plan: the files, printed even with -q
        click.echo(f"would write {result.out}/:")
        for f in result.files:
            size = f"{f.size:,} B" if f.size is not None else "-"
            click.echo(f"  {f.name:<40} {size:>16}  {f.how}")
        if options["onnx"]:
            click.echo(f"  {'onnx/':<40} {'-':>16}  export ({options['onnx_dtype']})")
        return
    if quiet:
        click.echo(f"wrote {result.out}")
    if result.pushed is not None:
        p = result.pushed
        click.echo(f"pushed: {p.url}" if p.uploaded else f"{p.repo_id} already holds these files: nothing to upload")


if __name__ == "__main__":
    main()
