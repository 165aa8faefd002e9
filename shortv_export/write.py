"""Stage 4, write: the standalone ShortV checkpoint folder, built beside its destination and renamed into place.

Weights are never loaded: the safetensors shards are hard-linked (or copied where links are impossible)
unchanged. Everything else a user needs to run the base model (processor, tokenizer, chat template,
generation config) is copied as it is; config.json is rewritten and the two modeling files are added.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ShortVError
from .load import PICKLE_SUFFIXES, Source
from .models import ALL_MODELING_FILES, MODELING_DIR, SUPPORTED, modeling_files, shortv_config_dict

# Written by us, never copied from the base folder.
OWN_FILES = {"config.json", "README.md", "lc.json", "lc.png", *ALL_MODELING_FILES}
# Training leftovers a checkpoint folder may hold beside the model: not part of the model, never copied.
TRAINING_FILES = {"metrics.json", "trainer_state.json", "training_args.json", "all_results.json", "train_results.json"}
TRAINING_FILES |= {"eval_results.json"}
_PARTIAL = ".partial-"


@dataclass(frozen=True)
class PlannedFile:
    name: str  # path inside the output folder
    source: Path | None  # None: generated
    size: int | None  # bytes, when known
    how: str  # "link", "copy" or "new"


def plan_files(source: Source, extra: dict[str, bytes | None] | None = None) -> list[PlannedFile]:
    """Every file the output folder will hold, in write order (weights last). ``extra``: generated files (None:
    content not known yet). Weights a Hub source has not downloaded yet (a dry run) are listed by name."""
    plan = [PlannedFile("config.json", None, None, "new")]
    plan += [
        PlannedFile(name, MODELING_DIR / name, (MODELING_DIR / name).stat().st_size, "copy")
        for name in modeling_files(source.kind)
    ]
    plan += [
        PlannedFile(name, None, None if data is None else len(data), "new") for name, data in (extra or {}).items()
    ]
    base_files = sorted(p for p in source.path.iterdir() if p.is_file() and not p.name.startswith("."))
    for path in base_files:
        name = path.name
        if name in OWN_FILES or name in TRAINING_FILES or name in (extra or {}) or name.endswith(PICKLE_SUFFIXES):
            continue
        size = path.stat().st_size if path.exists() else None
        plan.append(PlannedFile(name, path, size, "link" if name.endswith(".safetensors") else "copy"))
    listed = {f.name for f in plan}
    plan += [PlannedFile(name, None, None, "download, link") for name in source.weights if name not in listed]
    return sorted(plan, key=lambda f: f.name.endswith(".safetensors"))


def check_output(out: Path, overwrite: bool, source: Source) -> None:
    """Raise ShortVError unless ``out`` may be written: new, or replaceable and not the source itself."""
    out = Path(out).resolve()
    if source.path == out or out in source.path.parents or source.path in out.parents:
        raise ShortVError(f"--out {out} is inside or around the source checkpoint; choose another folder")
    if out.exists() and not overwrite:
        raise ShortVError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ShortVError(f"{out} exists and is not a folder")
    if out.exists() and not _replaceable(out):
        raise ShortVError(
            f"--overwrite replaces only an empty folder or an earlier ShortV output, and {out} is neither "
            "(or is your home or current folder); choose another --out"
        )


def _replaceable(folder: Path) -> bool:
    """An existing --out that --overwrite may delete: empty, or a folder this tool wrote (its config.json has a
    ShortV model_type); never the home or current folder or one above them."""
    protected = {Path.home().resolve(), Path.cwd().resolve(), Path("/")}
    if folder in protected or any(folder in p.parents for p in protected):
        return False
    if not any(folder.iterdir()):
        return True
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return False
    return str(model_type).startswith("shortv_")


def write_checkpoint(
    source: Source,
    layers: list[int],
    out: str | Path,
    *,
    overwrite: bool = False,
    extra: dict[str, bytes] | None = None,
    progress: Callable | None = None,
    finalize: Callable[[Path], None] | None = None,
    prune: dict | None = None,
) -> Path:
    """Write the ShortV checkpoint of ``source`` freezing ``layers`` (with token pruning ``prune``, if any) to
    ``out``; return its path.

    ``extra``: more generated files (name -> content), e.g. lc.json and the model card. Atomic: the folder is
    built as a hidden sibling and renamed into place, so an interrupted run leaves no output folder; an
    existing ``out`` is replaced only with ``overwrite`` and only once the new folder is complete.
    ``finalize(folder)`` runs on the complete temporary folder before the rename (e.g. the ONNX export): if
    it raises, nothing is written.
    """
    out = Path(out).resolve()
    check_output(out, overwrite, source)
    config = shortv_config_dict(source.config, layers, prune)
    config_cls = SUPPORTED[source.kind].config_cls
    try:  # the config must load with our class before anything is written
        config_cls.from_dict({k: v for k, v in config.items() if k != "auto_map"})
    except (ValueError, TypeError) as err:
        raise ShortVError(f"the ShortV config would not load: {err}") from None

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_PARTIAL}{os.getpid()}-", dir=out.parent))
    files = plan_files(source, extra)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM)
    if main_thread:
        signal.signal(signal.SIGTERM, _raise_interrupt)  # run the cleanup below on `kill` too
    try:
        for planned in (progress or _identity)(files):
            dest = tmp / planned.name
            if planned.name == "config.json":
                dest.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            elif planned.source is None:
                dest.write_bytes(extra[planned.name])
            elif planned.how == "link":
                _link_or_copy(planned.source, dest)
            else:
                shutil.copy2(planned.source, dest)
        if finalize is not None:
            finalize(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}{_PARTIAL}{os.getpid()}-old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return out


def _link_or_copy(src: Path, dest: Path) -> None:
    real = Path(os.path.realpath(src))  # Hub cache snapshots are symlinks into blobs/
    try:
        os.link(real, dest)
    except OSError:
        shutil.copy2(real, dest)


def _remove_stale_partials(out: Path) -> None:
    """Remove hidden build folders left by runs that were killed (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}{_PARTIAL}*"):
        pid = stale.name[len(f".{out.name}{_PARTIAL}") :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _identity(items):
    return items
