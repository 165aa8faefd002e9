"""The ShortV model classes as the library sees them: config building and in-process loading; and the stock
model's structure the stages read (its decoder, its visual placeholder tokens)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, NamedTuple

from . import families
from .compat import tested_range
from .modeling import configuration_shortv as configs


class Classes(NamedTuple):
    """A family's ShortV classes in ``modeling/``."""

    model_type: str  # the ShortV checkpoint's model_type
    config_cls: type
    model_cls: type
    modeling_file: str  # the family's model file, copied next to modeling_shortv.py


def _classes(family: families.Family) -> Classes:
    module = importlib.import_module(f"{__package__}.modeling.{family.modeling_file.removesuffix('.py')}")
    config_cls, model_cls = getattr(configs, family.config_class), getattr(module, family.model_class)
    return Classes(family.shortv_model_type, config_cls, model_cls, family.modeling_file)


SUPPORTED = {kind: _classes(family) for kind, family in families.FAMILIES.items()}  # base model_type -> classes
SHARED_FILES = families.SHARED_MODELING_FILES
ALL_MODELING_FILES = (*SHARED_FILES, *sorted({f.modeling_file for f in SUPPORTED.values()}))
MODELING_DIR = Path(configs.__file__).resolve().parent  # the repo's modeling/, installed


def modeling_files(base_type: str) -> tuple[str, ...]:
    """The model files a checkpoint of ``base_type`` carries: the shared two and its family's."""
    return (*SHARED_FILES, SUPPORTED[base_type].modeling_file)


def text_model(model):
    """The decoder of a stock VLM: ``language_model`` (LLaVA, Qwen2-VL) or ``text_model`` (Idefics3, SmolVLM)."""
    return model.model.language_model if "language_model" in model.model._modules else model.model.text_model


def visual_token_ids(config) -> list[int]:
    """The placeholder tokens whose rows hold image (and video) features."""
    return [getattr(config, k) for k in ("image_token_id", "video_token_id") if getattr(config, k, None) is not None]


# The Auto classes transformers (5.23, 5.24) registers a stock model_type under (its auto mappings): these for every
# family, and _MORE_AUTO_CLASSES.
_AUTO_CLASSES = ("AutoModel", "AutoModelForImageTextToText", "AutoModelForMultimodalLM")
_MORE_AUTO_CLASSES = {
    **dict.fromkeys(("llava", "llava_next", "llava_onevision", "idefics3", "mistral3"), ("AutoModelForPreTraining",)),
    "gemma3": ("AutoModelForPreTraining", "AutoModelForCausalLM", "AutoModelForSequenceClassification"),
}


def auto_map(base_type: str) -> dict[str, str]:
    """A ShortV checkpoint's ``auto_map``: its config class, and each Auto class the stock ``base_type`` loads with
    -> the ShortV class in that role: the generation class (``AutoModel`` too: it loads a ShortV checkpoint as the
    generation class), or the family's sequence classifier."""
    family = SUPPORTED[base_type]
    module, generation = family.modeling_file.removesuffix(".py"), family.model_cls.__name__
    classifier = generation.replace("ForConditionalGeneration", "ForSequenceClassification")
    classes = {"AutoConfig": f"configuration_shortv.{family.config_cls.__name__}"}
    for auto in (*_AUTO_CLASSES, *_MORE_AUTO_CLASSES.get(base_type, ())):
        classes[auto] = f"{module}.{classifier if auto == 'AutoModelForSequenceClassification' else generation}"
    return classes


def shortv_config_dict(base: dict[str, Any], layers: list[int], prune: dict | None = None) -> dict[str, Any]:
    """The ``config.json`` of a ShortV checkpoint made from a base model's ``config.json`` dict, with token
    pruning ``prune`` (FastV / VTW, the config's ``shortv_prune``) where given."""
    base_type = base.get("model_type")
    if base_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {base_type!r}; supported: {', '.join(SUPPORTED)}")
    family = SUPPORTED[base_type]
    config = dict(
        base, model_type=family.model_type, shortv_layers=[int(i) for i in layers], shortv_transformers=tested_range()
    )
    if prune:
        config["shortv_prune"] = dict(prune)
    config["architectures"] = [family.model_cls.__name__]
    config["auto_map"] = auto_map(base_type)
    config.pop("_name_or_path", None)
    return config


def load_shortv(base_dir: str | Path, layers: list[int], prune: dict | None = None, **kwargs):
    """Load a base model folder as an in-process ShortV model freezing ``layers`` (weights as they are), with
    token pruning ``prune`` where given."""
    base = json.loads((Path(base_dir) / "config.json").read_text())
    config_dict = shortv_config_dict(base, layers, prune)
    family = SUPPORTED[base["model_type"]]
    config = family.config_cls.from_dict({k: v for k, v in config_dict.items() if k != "auto_map"})
    if "attn_implementation" in kwargs:
        config._attn_implementation = kwargs["attn_implementation"]
    return family.model_cls.from_pretrained(base_dir, config=config, **kwargs)
