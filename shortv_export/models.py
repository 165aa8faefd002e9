"""The ShortV model classes as the library sees them: config building and in-process loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .compat import tested_range
from .modeling import modeling_shortv_llava
from .modeling.configuration_shortv_llava import ShortVLlavaConfig, ShortVLlavaNextConfig
from .modeling.modeling_shortv_llava import ShortVLlavaForConditionalGeneration, ShortVLlavaNextForConditionalGeneration

SUPPORTED = {  # base model_type -> (ShortV model_type, config class, model class)
    "llava": ("shortv_llava", ShortVLlavaConfig, ShortVLlavaForConditionalGeneration),
    "llava_next": ("shortv_llava_next", ShortVLlavaNextConfig, ShortVLlavaNextForConditionalGeneration),
}
MODELING_FILES = ("configuration_shortv_llava.py", "modeling_shortv_llava.py")
MODELING_DIR = Path(modeling_shortv_llava.__file__).resolve().parent  # the repo's modeling/, installed


def shortv_config_dict(base: dict[str, Any], layers: list[int]) -> dict[str, Any]:
    """The ``config.json`` of a ShortV checkpoint made from a base LLaVA ``config.json`` dict."""
    base_type = base.get("model_type")
    if base_type not in SUPPORTED:
        raise ValueError(f"not a LLaVA config: model_type {base_type!r}")
    model_type, config_cls, model_cls = SUPPORTED[base_type]
    config = dict(
        base, model_type=model_type, shortv_layers=[int(i) for i in layers], shortv_transformers=tested_range()
    )
    config["architectures"] = [model_cls.__name__]
    config["auto_map"] = {
        "AutoConfig": f"configuration_shortv_llava.{config_cls.__name__}",
        "AutoModel": f"modeling_shortv_llava.{model_cls.__name__}",
        "AutoModelForImageTextToText": f"modeling_shortv_llava.{model_cls.__name__}",
    }
    config.pop("_name_or_path", None)
    return config


def load_shortv(base_dir: str | Path, layers: list[int], **kwargs):
    """Load a base LLaVA folder as an in-process ShortV model freezing ``layers`` (weights as they are)."""
    base = json.loads((Path(base_dir) / "config.json").read_text())
    config_dict = shortv_config_dict(base, layers)
    _, config_cls, model_cls = SUPPORTED[base["model_type"]]
    config = config_cls.from_dict({k: v for k, v in config_dict.items() if k != "auto_map"})
    if "attn_implementation" in kwargs:
        config._attn_implementation = kwargs["attn_implementation"]
    return model_cls.from_pretrained(base_dir, config=config, **kwargs)
