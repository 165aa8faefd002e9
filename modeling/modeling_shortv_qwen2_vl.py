"""ShortV for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (Yuan et al., 2025, arXiv 2504.00502).

The frozen decoder layer and the plumbing are in ``modeling_shortv.py``; this file names the visual rows and
encodes images and videos as the stock ``forward`` does.

Visual rows: the positions of ``config.image_token_id`` (``<|image_pad|>``) and ``config.video_token_id``
(``<|video_pad|>``); the ``<|vision_start|>`` / ``<|vision_end|>`` markers around them are text. Positions are
multimodal RoPE (3-D ids from ``get_rope_index``), computed by the stock model as usual: a frozen layer
rotates its text queries with the cos/sin the text model made for those rows, and builds its masks from the
text positions. Qwen2-VL / Qwen2.5-VL: q/k/v projections have biases; nothing else differs from a Qwen2 layer.
Qwen3-VL: q/k RMSNorm per head before RoPE, interleaved M-RoPE sections (both inside the stock cos/sin and
norms the frozen layer reuses), and deepstack: features of earlier vision layers are added to the visual rows
after each of the first decoder layers, by the stock text model between layers, so a frozen layer's visual
rows get them too, exactly as the dense model's do.
"""

from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
)

from .configuration_shortv import ShortVQwen2_5_VLConfig, ShortVQwen2VLConfig, ShortVQwen3VLConfig
from .modeling_shortv import ShortVForConditionalGenerationMixin, ShortVModelMixin, _flags, mirror_weight_renames


class ShortVQwen2VLModelMixin(ShortVModelMixin):
    visual_token_keys = ("image_token_id", "video_token_id")
    pixel_keys = ("pixel_values", "pixel_values_videos")

    def encode(self, inputs: dict) -> dict:
        encoded = {}
        if inputs.get("pixel_values") is not None:
            encoded["image"] = self.get_image_features(
                inputs["pixel_values"], inputs.get("image_grid_thw"), return_dict=True, **_flags(inputs)
            )
        if inputs.get("pixel_values_videos") is not None:
            encoded["video"] = self.get_video_features(
                inputs["pixel_values_videos"], inputs.get("video_grid_thw"), return_dict=True, **_flags(inputs)
            )
        return encoded


class ShortVQwen2VLModel(ShortVQwen2VLModelMixin, Qwen2VLModel):
    config_class = ShortVQwen2VLConfig


class ShortVQwen2_5_VLModel(ShortVQwen2VLModelMixin, Qwen2_5_VLModel):
    config_class = ShortVQwen2_5_VLConfig


class ShortVQwen3VLModel(ShortVQwen2VLModelMixin, Qwen3VLModel):
    config_class = ShortVQwen3VLConfig


class ShortVQwen2VLForConditionalGeneration(ShortVForConditionalGenerationMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVQwen2VLConfig
    shortv_model_class = ShortVQwen2VLModel


class ShortVQwen2_5_VLForConditionalGeneration(ShortVForConditionalGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVQwen2_5_VLConfig
    shortv_model_class = ShortVQwen2_5_VLModel


class ShortVQwen3VLForConditionalGeneration(ShortVForConditionalGenerationMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVQwen3VLConfig
    shortv_model_class = ShortVQwen3VLModel


# Qwen/Qwen2-VL-* checkpoints store the pre-v5 weight names that transformers renames on load for these classes.
mirror_weight_renames(
    (f"ShortV{family}{suffix}", f"{family}{suffix}")
    for family in ("Qwen2VL", "Qwen2_5_VL", "Qwen3VL")
    for suffix in ("Model", "ForConditionalGeneration")
)
