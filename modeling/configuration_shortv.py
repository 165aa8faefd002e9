"""Configurations of ShortV checkpoints: the base model's configuration plus three fields.

ShortV (Yuan et al., 2025, arXiv 2504.00502) freezes visual tokens in the decoder layers listed in
``shortv_layers``: there, only text tokens are queries and go through the MLP, while visual tokens keep
their hidden state. ``shortv_prune`` adds token pruning, which removes visual tokens from layer K on:
``{"method": "fastv", "layer": K, "ratio": R}`` (FastV: keep the round((1 - R) x n) visual tokens the last prompt
token attends to most in layer K-1) or ``{"method": "vtw", "layer": K}`` (VTW: remove them all); None for none.
``shortv_transformers`` records the transformers versions the checkpoint was tested with
(``{"tested": [lowest, highest], "converted_with": version}``); the model warns when it runs on another. Everything
else is the stock configuration of the family (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Idefics3,
SmolVLM, Gemma 3, Qwen3-VL, Mistral 3).
"""

from huggingface_hub.dataclasses import strict
from transformers import (
    Gemma3Config,
    Idefics3Config,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    Mistral3Config,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3VLConfig,
    SmolVLMConfig,
)


class ShortVConfigMixin:
    """``shortv_layers`` (ids of the decoder layers that freeze visual tokens) and ``shortv_prune``, checked against
    the text model."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = list(self.shortv_layers or [])
        n_layers = self.text_config.num_hidden_layers
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"shortv_layers must be distinct layer ids in [0, {n_layers}), got {layers}")
        self.shortv_layers = layers
        self.shortv_prune = check_prune(self.shortv_prune, n_layers)


def check_prune(prune: dict | None, n_layers: int) -> dict | None:
    """``prune`` as the config stores it (FastV's ratio a float), or ValueError saying what is wrong."""
    if not prune:
        return None
    method, layer = prune.get("method"), prune.get("layer")
    keys = {"fastv": {"method", "layer", "ratio"}, "vtw": {"method", "layer"}}.get(method)
    if keys is None or set(prune) != keys:
        raise ValueError(
            'shortv_prune must be {"method": "fastv", "layer": K, "ratio": R} or {"method": "vtw", "layer": K}, '
            f"got {prune}"
        )
    if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer < n_layers:
        raise ValueError(f"shortv_prune's layer must be in [1, {n_layers}) for {n_layers} layers, got {layer!r}")
    if method == "vtw":
        return {"method": "vtw", "layer": layer}
    ratio = prune["ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ValueError(f"FastV's ratio (the share of visual tokens removed) must be in (0, 1), got {ratio!r}")
    return {"method": "fastv", "layer": layer, "ratio": float(ratio)}


@strict
class ShortVLlavaConfig(ShortVConfigMixin, LlavaConfig):
    model_type = "shortv_llava"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None


@strict
class ShortVLlavaNextConfig(ShortVConfigMixin, LlavaNextConfig):
    model_type = "shortv_llava_next"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None


@strict
class ShortVLlavaOnevisionConfig(ShortVConfigMixin, LlavaOnevisionConfig):
    model_type = "shortv_llava_onevision"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None


@strict
class ShortVQwen2VLConfig(ShortVConfigMixin, Qwen2VLConfig):
    model_type = "shortv_qwen2_vl"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None


@strict
class ShortVQwen2_5_VLConfig(ShortVConfigMixin, Qwen2_5_VLConfig):
    model_type = "shortv_qwen2_5_vl"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None


@strict
class ShortVIdefics3Config(ShortVConfigMixin, Idefics3Config):
    model_type = "shortv_idefics3"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None


@strict
class ShortVSmolVLMConfig(ShortVConfigMixin, SmolVLMConfig):
    model_type = "shortv_smolvlm"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None


@strict
class ShortVGemma3Config(ShortVConfigMixin, Gemma3Config):
    model_type = "shortv_gemma3"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None


@strict
class ShortVQwen3VLConfig(ShortVConfigMixin, Qwen3VLConfig):
    model_type = "shortv_qwen3_vl"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None


@strict
class ShortVMistral3Config(ShortVConfigMixin, Mistral3Config):
    model_type = "shortv_mistral3"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None
    shortv_prune: dict | None = None
