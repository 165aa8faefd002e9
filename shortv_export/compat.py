"""What differs between the transformers releases this project supports (see README, "Versions")."""

from __future__ import annotations

import inspect
import re
from typing import Any

# The range CI tests (lowest and highest); written into each checkpoint's config as ``shortv_transformers``.
TESTED_TRANSFORMERS = ("5.23.0", "5.24.0")


def cache_kwarg() -> str:
    """The name the installed transformers gives the KV cache argument: ``cache`` from 5.24, ``past_key_values``
    before."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(outputs) -> Any:
    """The KV cache a model returned (``outputs.cache`` from 5.24, ``outputs.past_key_values`` before)."""
    return outputs["cache"] if "cache" in outputs else outputs.get("past_key_values")


def tested_range() -> dict[str, Any]:
    """``shortv_transformers`` of a checkpoint converted with the installed transformers: the range the model code
    is tested with (CI runs both ends), widened to the installed version, which the verify stage runs on."""
    import transformers

    running = transformers.__version__
    low, high = TESTED_TRANSFORMERS
    high = max(high, running, key=version_key)
    return {"tested": [low, high], "converted_with": running}


def version_key(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as '5.24.0' or '5.25.0.dev0'."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])
