"""The supported families: one row per base ``model_type``, the only place a stage learns what differs.

Data only (no torch or transformers import): load checks a checkpoint against it, models maps each row to its
classes in ``modeling/``, pipeline sizes the FLOPs of a typical image with it, card names the model file, and
onnx_export / onnx_runtime pick the graphs. Adding a family is one row here plus its model file in
``modeling/`` (which keeps its own knowledge: it imports nothing from this package).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Text models whose decoder layer has a frozen branch (modeling_shortv.FROZEN_LAYERS).
LLAMA_LIKE = ("llama", "mistral", "qwen2")
TEXT_MODELS = (*LLAMA_LIKE, "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "gemma3_text")


@dataclass(frozen=True)
class Family:
    """What the stages need to know of one supported base ``model_type``."""

    model_type: str  # the base checkpoint's config.json model_type
    display: str  # for messages and the card
    classes: str  # class-name stem in modeling/: ShortV{classes}Config / ShortV{classes}ForConditionalGeneration
    modeling_file: str  # the family's model file in modeling/, copied next to the shared two
    text_models: tuple[str, ...]  # text model_types it is converted with
    visual_tokens: tuple[str, ...]  # config fields of the placeholder tokens whose rows are visual
    typical_visual_tokens: Callable[[Any], int]  # visual tokens of one typical image, from the stock config
    onnx: str | None = None  # ONNX export kind: "llava" (one image tensor), "tiled" (tiles + pixel masks),
    # "mrope" (Qwen-VL patches + grid, 3-D positions); None: --onnx is refused
    onnx_prune: bool = False  # its ONNX export takes --fastv / --vtw (the pruning in the decoder graph, tested)
    video_processor: bool = False  # its processor has a video processor (needs torchvision to load)
    torchvision: bool = False  # its stock processor does not load without torchvision (a video processor, Pixtral)
    nested_images: bool = False  # its processor takes a list of images per prompt
    processor_needs: tuple[str, ...] = ()  # extra Python packages its processor imports

    @property
    def shortv_model_type(self) -> str:
        return f"shortv_{self.model_type}"

    @property
    def config_class(self) -> str:
        return f"ShortV{self.classes}Config"

    @property
    def model_class(self) -> str:
        return f"ShortV{self.classes}ForConditionalGeneration"


def _llava_next(config) -> int:  # 672x672 anyres: base view + 2x2 tiles of 24 x 24, with newlines
    return 2880


def _onevision(config) -> int:  # base view plus 2x2 tiles (5 x 729 at 384 px), newlines aside
    vision = config.vision_config
    return 5 * (vision.image_size // vision.patch_size) ** 2


def _qwen_vl(config) -> int:  # a 448x448 image: 14 px (16 for Qwen3-VL) patches merged 2x2
    vision = config.vision_config
    return (448 // (vision.patch_size * vision.spatial_merge_size)) ** 2


def _idefics3(config) -> int:  # a 2x2 split plus the global view (5 x 169 for Idefics3-8B, 5 x 64 for SmolVLM-256M)
    vision = config.vision_config
    return 5 * (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2


def _mistral3(config) -> int:  # a 1024x1024 image: patches merged 2x2, 36 x 36 (row breaks are text)
    side = 1024 // (config.vision_config.patch_size * config.spatial_merge_size)
    return side * side


def _gemma3(config) -> int:  # the fixed count per image (256)
    return int(config.mm_tokens_per_image)


def _fixed(config) -> int:  # LLaVA-1.5: the projector's fixed count (576 at 336 px)
    return int(getattr(config, "image_seq_length", None) or 576)


IMAGE = ("image_token_id",)
IMAGE_VIDEO = ("image_token_id", "video_token_id")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "llava",
            display="LLaVA-1.5",
            classes="Llava",
            modeling_file="modeling_shortv_llava.py",
            text_models=LLAMA_LIKE,
            visual_tokens=IMAGE,
            typical_visual_tokens=_fixed,
            onnx="llava",
            onnx_prune=True,
        ),
        Family(
            "llava_next",
            display="LLaVA-NeXT",
            classes="LlavaNext",
            modeling_file="modeling_shortv_llava.py",
            text_models=LLAMA_LIKE,
            visual_tokens=IMAGE,
            typical_visual_tokens=_llava_next,
            onnx="llava",
        ),
        Family(
            "llava_onevision",
            display="LLaVA-OneVision",
            classes="LlavaOnevision",
            modeling_file="modeling_shortv_llava.py",
            text_models=LLAMA_LIKE,
            visual_tokens=IMAGE_VIDEO,
            typical_visual_tokens=_onevision,
            video_processor=True,
            torchvision=True,
        ),
        Family(
            "qwen2_vl",
            display="Qwen2-VL",
            classes="Qwen2VL",
            modeling_file="modeling_shortv_qwen2_vl.py",
            text_models=("qwen2_vl_text",),
            visual_tokens=IMAGE_VIDEO,
            typical_visual_tokens=_qwen_vl,
            onnx="mrope",
            video_processor=True,
            torchvision=True,
        ),
        Family(
            "qwen2_5_vl",
            display="Qwen2.5-VL",
            classes="Qwen2_5_VL",
            modeling_file="modeling_shortv_qwen2_vl.py",
            text_models=("qwen2_5_vl_text",),
            visual_tokens=IMAGE_VIDEO,
            typical_visual_tokens=_qwen_vl,
            onnx="mrope",
            onnx_prune=True,
            video_processor=True,
            torchvision=True,
        ),
        Family(
            "qwen3_vl",
            display="Qwen3-VL",
            classes="Qwen3VL",
            modeling_file="modeling_shortv_qwen2_vl.py",
            text_models=("qwen3_vl_text",),
            visual_tokens=IMAGE_VIDEO,
            typical_visual_tokens=_qwen_vl,
            video_processor=True,
            torchvision=True,
        ),
        Family(
            "idefics3",
            display="Idefics3",
            classes="Idefics3",
            modeling_file="modeling_shortv_idefics3.py",
            text_models=LLAMA_LIKE,
            visual_tokens=IMAGE,
            typical_visual_tokens=_idefics3,
            onnx="tiled",
            nested_images=True,
        ),
        Family(
            "smolvlm",
            display="SmolVLM",
            classes="SmolVLM",
            modeling_file="modeling_shortv_idefics3.py",
            text_models=LLAMA_LIKE,
            visual_tokens=IMAGE,
            typical_visual_tokens=_idefics3,
            onnx="tiled",
            video_processor=True,
            torchvision=True,
            nested_images=True,
            processor_needs=("num2words",),
        ),
        Family(
            "gemma3",
            display="Gemma 3",
            classes="Gemma3",
            modeling_file="modeling_shortv_gemma3.py",
            text_models=("gemma3_text",),
            visual_tokens=IMAGE,
            typical_visual_tokens=_gemma3,
            nested_images=True,
        ),
        Family(
            "mistral3",
            display="Mistral 3",
            classes="Mistral3",
            modeling_file="modeling_shortv_llava.py",
            text_models=LLAMA_LIKE,
            visual_tokens=IMAGE,
            typical_visual_tokens=_mistral3,
            torchvision=True,
        ),
    )
}
SHARED_MODELING_FILES = ("configuration_shortv.py", "modeling_shortv.py")


def family(model_type: str) -> Family:
    """The row of a base ``model_type`` (KeyError when unsupported: check with ``model_type in FAMILIES``)."""
    return FAMILIES[model_type]


def onnx_families() -> tuple[str, ...]:
    """The base model_types ``--onnx`` exports."""
    return tuple(k for k, f in FAMILIES.items() if f.onnx is not None)
