"""Small helpers every stage shares, each written once: one-line error text, progress bars, the offline check."""

from __future__ import annotations

import os


def one_line(err: BaseException, limit: int | None = None) -> str:
    """The whole reason of ``err`` on one line (cut to ``limit`` characters when given)."""
    line = " ".join(str(err).split()) or type(err).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


def first_line(err: BaseException, limit: int | None = None) -> str:
    """``err``'s type and the first line of its message (``RuntimeError: the graph broke``), cut to ``limit``
    characters when given: for errors whose later lines are pages of detail (torch.export's)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it"):
    """A tqdm bar with a label and a unit (``enabled=False``: a bar that prints nothing)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def hub_offline() -> bool:
    """Offline mode as huggingface_hub reads it at import, or HF_HUB_OFFLINE set since."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return bool(constants.HF_HUB_OFFLINE) or value in ("1", "ON", "YES", "TRUE")
