"""shortv-export: turn vision-language checkpoints (LLaVA, Qwen-VL, Gemma 3, ...) into standalone ShortV
checkpoints (visual tokens frozen in the layers calibration finds ineffective).

    from shortv_export import convert
    result = convert("llava-hf/llava-1.5-7b-hf", n=19)

`convert`, `CalibrationOptions` and `ConvertResult` live in `shortv_export.pipeline`; they are imported on first
use, so that importing the package (or running `shortv-export --help`) does not load torch.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("shortv-export")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["CalibrationOptions", "ConvertResult", "convert", "__version__"]


def __getattr__(name: str):
    if name in ("CalibrationOptions", "ConvertResult", "convert"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'shortv_export' has no attribute {name!r}")
