"""Configuration for ShortV LLaVA checkpoints.

ShortV (Yuan et al., 2025, arXiv 2504.00502) freezes visual tokens in the decoder layers listed in
``shortv_layers``: there, only text tokens are queries and go through the MLP, while visual tokens keep
their hidden state. ``shortv_transformers`` records the transformers versions the checkpoint was tested with
(``{"tested": [lowest, highest], "converted_with": version}``); the model warns when it runs on another. Everything
else is the stock LLaVA / LLaVA-NeXT configuration.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig, LlavaNextConfig


def _check_layers(config) -> None:
    layers = list(config.shortv_layers or [])
    n_layers = config.text_config.num_hidden_layers
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"shortv_layers must be distinct layer ids in [0, {n_layers}), got {layers}")
    config.shortv_layers = layers


@strict
class ShortVLlavaConfig(LlavaConfig):
    """`LlavaConfig` plus `shortv_layers`: ids of the decoder layers that freeze visual tokens."""

    model_type = "shortv_llava"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_layers(self)


@strict
class ShortVLlavaNextConfig(LlavaNextConfig):
    """`LlavaNextConfig` plus `shortv_layers`: ids of the decoder layers that freeze visual tokens."""

    model_type = "shortv_llava_next"
    shortv_layers: list | None = None
    shortv_transformers: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_layers(self)
