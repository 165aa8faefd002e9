"""The `shortv-export` command: a thin layer over one library function per stage."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from .card import model_card
from .errors import ShortVError
from .flops import flops_summary
from .load import Source, resolve_model
from .select import parse_layers
from .write import check_output, plan_files, write_checkpoint

DEFAULT_TEXT_TOKENS = 64


def default_visual_tokens(source: Source) -> int:
    """Visual tokens of one typical image: LLaVA-1.5's fixed count, LLaVA-NeXT's 672x672 anyres (2880)."""
    if source.kind == "llava_next":
        return 2880
    return int(source.config.get("image_seq_length", 576))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("model")
@click.option(
    "--layers",
    "layers_spec",
    metavar="IDS|paper",
    help="Frozen layers, lowest LC first (e.g. 31,29,30), or 'paper' for the published list.",
)
@click.option("--out", type=click.Path(path_type=Path), help="Output folder [default: ./<model>-shortv-n<N>].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--revision", help="Hub revision of MODEL (branch, tag or commit).")
@click.option("--dry-run", is_flag=True, help="Print the plan, the FLOPs ratio and the files; write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; print only the result.")
def main(model, layers_spec, out, overwrite, revision, dry_run, quiet):
    """Convert MODEL (a llava-hf Hub id or a local folder) into a standalone ShortV checkpoint."""
    try:
        run(model, layers_spec, out, overwrite, revision, dry_run, quiet)
    except ShortVError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted; nothing was written.", err=True)
        sys.exit(130)


def run(model, layers_spec, out, overwrite, revision, dry_run, quiet):
    say = (lambda *a, **k: None) if quiet else click.echo
    source = resolve_model(model, revision=revision, config_only=dry_run)
    if layers_spec is None:
        raise ShortVError("pass --layers IDS or --layers paper (LC calibration is not available yet)")
    layers = parse_layers(layers_spec, source.num_layers, source.model_id, source.name)
    out = out or Path(f"{source.name}-shortv-n{len(layers)}")
    check_output(out, overwrite, source)
    flops = flops_summary(source.hf_config.text_config, default_visual_tokens(source), DEFAULT_TEXT_TOKENS, layers)
    command = shlex.join(["shortv-export", model, "--layers", ",".join(map(str, layers))])
    card = model_card(source, layers, flops, command).encode()

    say(f"{source.model_id}: {source.kind}, {source.num_layers} decoder layers")
    say(f"frozen for visual tokens: {len(layers)} layers {layers}")
    say(
        f"prefill FLOPs at {flops['n_visual']} visual + {flops['n_text']} text tokens: "
        f"{_tflops(flops['vanilla_tflops'])} -> {_tflops(flops['shortv_tflops'])} "
        f"(ratio {flops['ratio']:.3f}, ideal speed-up {flops['ideal_speedup']:.2f}x)"
    )
    if dry_run:
        say(f"would write {out}/:")
        for f in plan_files(source, {"README.md": card}):
            size = f"{f.size:,} B" if f.size is not None else "-"
            say(f"  {f.name:<40} {size:>16}  {f.how}")
        return
    progress = None if quiet else _progress("writing")
    path = write_checkpoint(source, layers, out, overwrite=overwrite, extra={"README.md": card}, progress=progress)
    click.echo(f"wrote {path}")


def _tflops(t: float) -> str:
    return f"{t:.2f} TFLOPs" if t >= 0.01 else f"{t * 1e3:.3g} GFLOPs"


def _progress(desc):
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=desc, unit="file")


if __name__ == "__main__":
    main()
