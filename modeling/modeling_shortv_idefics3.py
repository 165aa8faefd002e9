"""ShortV for Idefics3 and SmolVLM (Yuan et al., 2025, arXiv 2504.00502).

The frozen decoder layer and the plumbing are in ``modeling_shortv.py``; this file names the visual rows and
encodes the images as the stock ``forward`` does.

Visual rows: the positions of ``config.image_token_id`` (``<image>``), in every span the processor writes
(one per tile of a split image, plus the global view); the ``<fake_token_around_image>`` and
``<row_x_col_y>`` / ``<global-img>`` markers between spans are text. Text model: Llama.
"""

from transformers import (
    GenerationConfig,
    Idefics3ForConditionalGeneration,
    Idefics3Model,
    SmolVLMForConditionalGeneration,
    SmolVLMModel,
)

from .configuration_shortv import ShortVIdefics3Config, ShortVSmolVLMConfig
from .modeling_shortv import ShortVForConditionalGenerationMixin, ShortVModelMixin, mirror_weight_renames


class ShortVIdefics3ModelMixin(ShortVModelMixin):
    def encode(self, inputs: dict) -> dict:
        image = self.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"), return_dict=True)
        return {"image": image}


class ShortVIdefics3Model(ShortVIdefics3ModelMixin, Idefics3Model):
    config_class = ShortVIdefics3Config


class ShortVSmolVLMModel(ShortVIdefics3ModelMixin, SmolVLMModel):
    config_class = ShortVSmolVLMConfig


class ShortVIdefics3GenerationMixin(ShortVForConditionalGenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.image_token_id = self.config.image_token_id  # as the stock __init__ sets them
        self.vocab_size = config.text_config.vocab_size


class ShortVIdefics3ForConditionalGeneration(ShortVIdefics3GenerationMixin, Idefics3ForConditionalGeneration):
    """Idefics3 with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVIdefics3Config
    shortv_model_class = ShortVIdefics3Model


class ShortVSmolVLMForConditionalGeneration(ShortVIdefics3GenerationMixin, SmolVLMForConditionalGeneration):
    """SmolVLM with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVSmolVLMConfig
    shortv_model_class = ShortVSmolVLMModel

    def __init__(self, config: ShortVSmolVLMConfig):
        super().__init__(config)
        self.model.text_model.generation_config = GenerationConfig.from_model_config(config)


mirror_weight_renames(
    (f"ShortV{family}{suffix}", f"{family}{suffix}")
    for family in ("Idefics3", "SmolVLM")
    for suffix in ("Model", "ForConditionalGeneration")
)
