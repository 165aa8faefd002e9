"""ShortV for Idefics3 and SmolVLM (Yuan et al., 2025, arXiv 2504.00502).

The frozen decoder layer and the plumbing are in ``modeling_shortv.py``; this file names the visual rows and
encodes the images as the stock ``forward`` does.

Visual rows: the positions of ``config.image_token_id`` (``<image>``), in every span the processor writes
(one per tile of a split image, plus the global view); the ``<fake_token_around_image>`` and
``<row_x_col_y>`` / ``<global-img>`` markers between spans are text. Text model: Llama.
"""

from torch import nn
from transformers import (
    GenerationConfig,
    Idefics3ForConditionalGeneration,
    Idefics3Model,
    SmolVLMForConditionalGeneration,
    SmolVLMModel,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3PreTrainedModel
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMPreTrainedModel

from .configuration_shortv import ShortVIdefics3Config, ShortVSmolVLMConfig
from .modeling_shortv import ShortVModelMixin, mirror_weight_renames


class ShortVIdefics3ModelMixin(ShortVModelMixin):
    def encode(self, inputs: dict) -> dict:
        image = self.get_image_features(inputs["pixel_values"], inputs.get("pixel_attention_mask"), return_dict=True)
        return {"image": image}


class ShortVIdefics3Model(ShortVIdefics3ModelMixin, Idefics3Model):
    config_class = ShortVIdefics3Config

    def __init__(self, config: ShortVIdefics3Config):
        super().__init__(config)
        self._shortv_init()


class ShortVSmolVLMModel(ShortVIdefics3ModelMixin, SmolVLMModel):
    config_class = ShortVSmolVLMConfig

    def __init__(self, config: ShortVSmolVLMConfig):
        super().__init__(config)
        self._shortv_init()


class ShortVIdefics3ForConditionalGeneration(Idefics3ForConditionalGeneration):
    """Idefics3 with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVIdefics3Config

    def __init__(self, config: ShortVIdefics3Config):
        Idefics3PreTrainedModel.__init__(self, config)  # the stock __init__ would build a stock Idefics3Model
        self.model = ShortVIdefics3Model(config)
        self.image_token_id = self.config.image_token_id
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.vocab_size = config.text_config.vocab_size
        self.post_init()


class ShortVSmolVLMForConditionalGeneration(SmolVLMForConditionalGeneration):
    """SmolVLM with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVSmolVLMConfig

    def __init__(self, config: ShortVSmolVLMConfig):
        SmolVLMPreTrainedModel.__init__(self, config)
        self.model = ShortVSmolVLMModel(config)
        self.model.text_model.generation_config = GenerationConfig.from_model_config(config)
        self.image_token_id = self.config.image_token_id
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.vocab_size = config.text_config.vocab_size
        self.post_init()


mirror_weight_renames(
    (f"ShortV{family}{suffix}", f"{family}{suffix}")
    for family in ("Idefics3", "SmolVLM")
    for suffix in ("Model", "ForConditionalGeneration")
)
