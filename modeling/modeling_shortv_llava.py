"""ShortV for LLaVA, LLaVA-NeXT, LLaVA-OneVision and Mistral 3 (Yuan et al., 2025, arXiv 2504.00502).

The frozen decoder layer and the plumbing are in ``modeling_shortv.py``; this file names the visual rows and
encodes the images (and OneVision's videos) as each stock ``forward`` does.

Visual rows: LLaVA and LLaVA-NeXT, the positions of ``config.image_token_id`` (LLaVA-NeXT's anyres tiles and
newline features included, all placed on image tokens); LLaVA-OneVision, those of ``image_token_id`` and
``video_token_id`` (its pooled frame features and the newline after each video); Mistral 3, those of
``image_token_id`` (``[IMG]``: the Pixtral tower's patches after the 2x2 spatial merge; the ``[IMG_BREAK]`` after
each row and the final ``[IMG_END]`` are text). Text models: Llama, Mistral, Qwen2 (OneVision's).
"""

from transformers import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    Mistral3ForConditionalGeneration,
    Mistral3Model,
)

from .configuration_shortv import (
    ShortVLlavaConfig,
    ShortVLlavaNextConfig,
    ShortVLlavaOnevisionConfig,
    ShortVMistral3Config,
)
from .modeling_shortv import ShortVForConditionalGenerationMixin, ShortVModelMixin, _flags, mirror_weight_renames


class ShortVLlavaModel(ShortVModelMixin, LlavaModel):
    config_class = ShortVLlavaConfig

    def encode(self, inputs: dict) -> dict:
        image = self.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs.get("image_sizes"),
            vision_feature_layer=inputs.get("vision_feature_layer"),
            vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"),
            return_dict=True,
            **_flags(inputs),
        )
        return {"image": image}


class ShortVLlavaNextModel(ShortVModelMixin, LlavaNextModel):
    config_class = ShortVLlavaNextConfig

    encode = ShortVLlavaModel.encode


class ShortVLlavaOnevisionModel(ShortVModelMixin, LlavaOnevisionModel):
    config_class = ShortVLlavaOnevisionConfig
    visual_token_keys = ("image_token_id", "video_token_id")
    pixel_keys = ("pixel_values", "pixel_values_videos")

    def encode(self, inputs: dict) -> dict:
        encoded = {}
        vision = {k: inputs.get(k) for k in ("vision_feature_layer", "vision_feature_select_strategy")}
        if inputs.get("pixel_values") is not None:
            encoded["image"] = self.get_image_features(
                inputs["pixel_values"],
                inputs.get("image_sizes"),
                **vision,
                batch_num_images=inputs.get("batch_num_images"),
                return_dict=True,
            )
        if inputs.get("pixel_values_videos") is not None:
            encoded["video"] = self.get_video_features(inputs["pixel_values_videos"], **vision, return_dict=True)
        return encoded


class ShortVMistral3Model(ShortVModelMixin, Mistral3Model):
    config_class = ShortVMistral3Config

    def encode(self, inputs: dict) -> dict:
        image = self.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=inputs.get("vision_feature_layer"),
            image_sizes=inputs.get("image_sizes"),
            return_dict=True,
        )
        return {"image": image}


class ShortVLlavaForConditionalGeneration(ShortVForConditionalGenerationMixin, LlavaForConditionalGeneration):
    """LLaVA with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVLlavaConfig
    shortv_model_class = ShortVLlavaModel


class ShortVLlavaNextForConditionalGeneration(ShortVForConditionalGenerationMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVLlavaNextConfig
    shortv_model_class = ShortVLlavaNextModel


class ShortVLlavaOnevisionForConditionalGeneration(
    ShortVForConditionalGenerationMixin, LlavaOnevisionForConditionalGeneration
):
    """LLaVA-OneVision with visual tokens (image and video) frozen in ``config.shortv_layers``."""

    config_class = ShortVLlavaOnevisionConfig
    shortv_model_class = ShortVLlavaOnevisionModel


class ShortVMistral3ForConditionalGeneration(ShortVForConditionalGenerationMixin, Mistral3ForConditionalGeneration):
    """Mistral 3 with visual tokens frozen in ``config.shortv_layers`` (see ``modeling_shortv.py``)."""

    config_class = ShortVMistral3Config
    shortv_model_class = ShortVMistral3Model


# Hub checkpoints store legacy weight names that transformers renames on load (and back on save) for the stock
# model types and classes; give ours the same renames.
mirror_weight_renames(
    [
        ("shortv_llava", "llava"),
        ("shortv_llava_next", "llava_next"),
        ("shortv_llava_onevision", "llava_onevision"),
        ("shortv_mistral3", "mistral3"),
    ]
    + [
        (f"ShortV{name}", name)
        for family in ("Llava", "LlavaNext", "LlavaOnevision", "Mistral3")
        for name in (f"{family}Model", f"{family}ForConditionalGeneration")
    ]
)
