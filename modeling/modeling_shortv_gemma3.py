"""ShortV for Gemma 3 (Yuan et al., 2025, arXiv 2504.00502).

The frozen decoder layer and the plumbing are in ``modeling_shortv.py``; this file names the visual rows and
encodes the images as the stock ``forward`` does.

Visual rows: the positions of ``config.image_token_id`` (the image's soft tokens between ``<start_of_image>`` and
``<end_of_image>``, which are text). What differs from a Llama layer, and how the frozen layer follows it: four
norms per layer (after attention, and before and after the MLP, each before its residual add); q/k RMSNorm per
head before RoPE; a different RoPE for sliding and global layers (the text rows' cos/sin are kept per attention
type); the stock mask lets an image's tokens attend to each other both ways, which only changes image queries,
so the text queries' rows are the plain causal (global layers) or sliding-window (local layers) ones.
"""

from torch import nn
from transformers import Gemma3ForConditionalGeneration, Gemma3ForSequenceClassification, Gemma3Model, PreTrainedModel

from .configuration_shortv import ShortVGemma3Config
from .modeling_shortv import ShortVForConditionalGenerationMixin, ShortVModelMixin, _flags, mirror_weight_renames


class ShortVGemma3Model(ShortVModelMixin, Gemma3Model):
    config_class = ShortVGemma3Config

    def encode(self, inputs: dict) -> dict:
        return {"image": self.get_image_features(inputs["pixel_values"], return_dict=True, **_flags(inputs))}


class ShortVGemma3ForConditionalGeneration(ShortVForConditionalGenerationMixin, Gemma3ForConditionalGeneration):
    """Gemma 3 with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVGemma3Config
    shortv_model_class = ShortVGemma3Model


class ShortVGemma3ForSequenceClassification(Gemma3ForSequenceClassification):
    """Gemma 3's sequence classifier (``AutoModelForSequenceClassification``) over the ShortV model: the stock
    ``__init__`` (``GenericForSequenceClassification``'s), with ``ShortVGemma3Model`` in place of the model it makes
    with ``AutoModel``."""

    config_class = ShortVGemma3Config

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = ShortVGemma3Model(config)
        self.score = nn.Linear(config.text_config.hidden_size, self.num_labels, bias=False)
        self.post_init()


mirror_weight_renames(
    [
        ("shortv_gemma3", "gemma3"),
        ("ShortVGemma3Model", "Gemma3Model"),
        ("ShortVGemma3ForConditionalGeneration", "Gemma3ForConditionalGeneration"),
        ("ShortVGemma3ForSequenceClassification", "Gemma3ForSequenceClassification"),
    ]
)
