"""Tiny, randomly initialised checkpoints of every supported family, built offline.

LLaVA / LLaVA-NeXT have the real architecture (CLIP vision tower, projector, a Llama, Mistral or Qwen2 decoder
with grouped-query attention; the ``*_sliding`` text kinds use a 6-token sliding window, shorter than every test
prompt). LLaVA-OneVision (SigLIP, anyres-max, Qwen2), Qwen2-VL / Qwen2.5-VL (their own vision towers, M-RoPE,
q/k/v biases) and Idefics3 / SmolVLM (SigLIP-like tower, pixel-shuffle connector, image splitting, Llama) are
built from their stock configs at toy sizes. Each has a real processor (the family's image processor and
processor class, a word-level tokenizer with the family's special tokens, a chat template in the family's
format) and is saved with ``save_pretrained``, so it exercises the same loading code as a Hub checkpoint.

``build_tiny`` builds LLaVA / LLaVA-NeXT with any of TEXT_KINDS; ``build_family`` every other family of
``families.FAMILIES`` (NEW_FAMILIES) from its row in ``_RECIPES``: its config, its processor, its special tokens.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import families

# Words the tokenizer knows; everything else maps to <unk>. Covers the default calibration prompts.
_WORDS = (
    "USER: ASSISTANT: what is the color of shape in this image ? . , a an animal person picture photo "
    "provide one-sentence caption for provided answer question using single word or phrase how many are "
    "there red green blue yellow black white gray circle square triangle rectangle yes no cat dog coffee "
    "rocket astronaut camera man woman street car sky tree water food cup table left right top bottom "
    "describe briefly which object kind of does look like main subject background foreground"
).split()
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>"
    "{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tokenizer(specials: tuple[str, ...] = (), named: dict[str, str] | None = None):
    """A word-level tokenizer over the calibration prompts' words, with the family's ``specials`` added
    (``named``: special tokens the processor reads by name, e.g. Gemma 3's ``boi_token``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    roles = ("user", "assistant", "system", "model") if specials else ()  # the other families' chat formats
    words = sorted({w.lower() for w in (*_WORDS, *roles)})
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + list(specials) + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", *specials],
        **({"extra_special_tokens": named} if named else {}),
        padding_side="left",
    )


SLIDING_WINDOW = 6
# every tiny vision tower: 2 layers of width 32, 2 heads
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXT_KINDS = ("llama", "mistral", "mistral_sliding", "qwen2", "qwen2_sliding")
# (kind, text) pairs the exactness checks cover: every text family, with and without a sliding window
FAMILIES = (
    ("llava", "llama"),
    ("llava_next", "llama"),
    ("llava", "mistral"),
    ("llava", "mistral_sliding"),
    ("llava", "qwen2"),
    ("llava", "qwen2_sliding"),
    ("llava_next", "mistral_sliding"),
    ("llava_next", "qwen2_sliding"),
    # the other families, each with its own text model (text: the decoder layer's kind)
    ("llava_onevision", "qwen2"),
    ("qwen2_vl", "qwen2"),
    ("qwen2_5_vl", "qwen2"),
    ("qwen3_vl", "qwen2"),
    ("idefics3", "llama"),
    ("smolvlm", "llama"),
    ("gemma3", "gemma3"),
    ("mistral3", "mistral"),
)


def text_config(text: str, **common):
    """A tiny text config of family ``text`` (one of TEXT_KINDS)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if text == "llama":
        return LlamaConfig(**common)
    if text in ("mistral", "mistral_sliding"):
        return MistralConfig(**common, sliding_window=SLIDING_WINDOW if text == "mistral_sliding" else None)
    if text == "qwen2":
        return Qwen2Config(**common)
    if text == "qwen2_sliding":  # layers >= 2 slide, 0 and 1 attend to everything: both mask kinds in one model
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=2)
    raise ValueError(f"text must be one of {', '.join(TEXT_KINDS)}, got {text!r}")


_LLAVA_KINDS = {"llava": "Llava", "llava_next": "LlavaNext"}  # kind -> transformers' class-name stem


def build_tiny(
    kind: str = "llava",
    num_layers: int = 6,
    text: str = "llama",
    seed: int = 0,
    image_size: int = 28,
    patch: int = 7,
    hidden: int = 64,
    init_std: float = 0.1,
    kv_heads: int = 2,
):
    """Return ``(model, processor)`` for a tiny random ``kind`` ('llava' or 'llava_next') checkpoint whose text
    model is ``text`` (one of TEXT_KINDS), with 4 attention heads and ``kv_heads`` key/value heads."""
    tokenizer = make_tokenizer()
    text_model = text_config(text, **_text_settings(tokenizer, hidden, num_layers, kv_heads, init_std))
    if kind not in _LLAVA_KINDS:
        raise ValueError(f"kind must be 'llava' or 'llava_next', got {kind!r}")
    config = _llava_config(kind, tokenizer, text_model, image_size, patch)
    torch.manual_seed(seed)
    model = _stock(f"{_LLAVA_KINDS[kind]}ForConditionalGeneration")(config)
    processor = _llava_processor(kind, tokenizer, image_size, patch)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def _llava_config(kind: str, tokenizer, text_model, image_size: int, patch: int):
    """LLaVA-1.5's config (a fixed count of visual tokens) or LLaVA-NeXT's (anyres tiles): a CLIP tower whose
    second-to-last layer's patch features are projected into ``text_model``."""
    vision = _stock("CLIPVisionConfig")(**TINY_TOWER, image_size=image_size, patch_size=patch, projection_dim=32)
    common = dict(
        vision_config=vision,
        text_config=text_model,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    if kind == "llava":
        return _stock("LlavaConfig")(**common, image_seq_length=(image_size // patch) ** 2)
    return _stock("LlavaNextConfig")(**common, image_grid_pinpoints=_pinpoints(image_size))


def _llava_processor(kind: str, tokenizer, image_size: int, patch: int):
    """LlavaProcessor with a CLIP image processor, or LlavaNextProcessor with its anyres one."""
    image_settings = dict(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    if kind == "llava":
        image_processor = _stock("CLIPImageProcessor")(**image_settings)
    else:
        image_processor = _stock("LlavaNextImageProcessor")(
            **image_settings, image_grid_pinpoints=_pinpoints(image_size)
        )
    return _stock(f"{_LLAVA_KINDS[kind]}Processor")(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny(path: str | Path, kind: str = "llava", **kwargs) -> Path:
    """Build a tiny checkpoint and save it like a Hub repo (safetensors, processor, chat template)."""
    path = Path(path)
    model, processor = build_family(kind, **kwargs) if kind in NEW_FAMILIES else build_tiny(kind, **kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# The families beyond LLaVA / LLaVA-NeXT (the other rows of families.FAMILIES), each built from its _Recipe.
NEW_FAMILIES = tuple(kind for kind in families.FAMILIES if kind not in _LLAVA_KINDS)


@dataclass(frozen=True)
class _Recipe:
    """How one family beyond LLaVA / LLaVA-NeXT is built at toy size."""

    stem: str  # transformers' class-name stem: {stem}Config, {stem}ForConditionalGeneration, {stem}Processor
    text: str  # its own text model (the decoder layer's kind, as in FAMILIES)
    specials: tuple[str, ...]  # the tokenizer's placeholder and chat-format tokens
    config: Callable[[str, Any, dict], dict]  # (kind, tokenizer, text settings) -> the config's arguments
    processor: Callable[[str, Any], Any]  # (kind, tokenizer) -> the processor
    named: dict[str, str] | None = None  # special tokens the processor reads by name


def build_family(
    kind: str,
    num_layers: int = 6,
    seed: int = 0,
    hidden: int = 64,
    init_std: float = 0.1,
    kv_heads: int = 2,
    text: str | None = None,
):
    """``(model, processor)`` for a tiny random checkpoint of ``kind`` (one of NEW_FAMILIES): 4 attention heads,
    ``kv_heads`` key/value heads, images of a few to a few dozen visual tokens."""
    recipe = _recipe(kind, text)
    tokenizer = make_tokenizer(recipe.specials, recipe.named)
    settings = _text_settings(tokenizer, hidden, num_layers, kv_heads, init_std)
    config = _stock(f"{recipe.stem}Config")(**recipe.config(kind, tokenizer, settings))
    torch.manual_seed(seed)
    model = _stock(f"{recipe.stem}ForConditionalGeneration")(config)
    processor = recipe.processor(kind, tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), processor


def _recipe(kind: str, text: str | None) -> _Recipe:
    """The recipe of ``kind``; ValueError for a kind build_family does not build or a text model not its own."""
    if kind not in NEW_FAMILIES:
        raise ValueError(f"kind must be one of {', '.join(('llava', 'llava_next', *NEW_FAMILIES))}, got {kind!r}")
    recipe = _RECIPES[kind]
    if text not in (None, recipe.text):
        raise ValueError(f"{kind} has its own text model, not {text!r}")
    return recipe


# Qwen2-VL / Qwen2.5-VL / Qwen3-VL: their own vision towers (7 px patches, merged 2x2), M-RoPE, q/k/v biases.
_QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_vl_config(kind: str, tokenizer, text: dict) -> dict:
    token = tokenizer.convert_tokens_to_ids
    return dict(
        text_config=_qwen_text(kind, text),
        vision_config=_qwen_vision(kind, text["hidden_size"]),
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        **_special_ids(tokenizer),
    )


def _qwen_text(kind: str, text: dict) -> dict:
    """The text settings with M-RoPE: Qwen2-VL's 2:3:3 sections; Qwen3-VL's interleaved (t, h, w alternate over
    the frequencies)."""
    head_dim = text["hidden_size"] // 4
    text = dict(
        text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(head_dim)}
    )
    if kind == "qwen3_vl":
        text["head_dim"] = head_dim
        text["rope_parameters"].update(
            mrope_section=[head_dim // 4, head_dim // 8, head_dim // 8], mrope_interleaved=True
        )
    return text


def _qwen_vision(kind: str, hidden: int) -> dict:
    """A 2-layer tower of the family's kind, projecting to the text model's width ``hidden``."""
    vision = dict(depth=2, num_heads=2, patch_size=7, spatial_merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=hidden, mlp_ratio=2)
    elif kind == "qwen2_5_vl":  # windowed attention but in its last layer
        vision.update(
            hidden_size=32, intermediate_size=64, out_hidden_size=hidden, window_size=28, fullatt_block_indexes=[1]
        )
    else:  # Qwen3-VL: deepstack from both vision layers
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=hidden,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        )
    return vision


def _qwen_vl_processor(kind: str, tokenizer):
    settings = dict(
        size={"shortest_edge": 4 * 14 * 14, "longest_edge": 16 * 14 * 14},
        patch_size=7,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073],  # Qwen2VLImageProcessor's; Qwen3-VL's video processor
        image_std=[0.26862954, 0.26130258, 0.27577711],  # has others
    )
    image_processor = _image_processor("Qwen2VLImageProcessor", **settings)
    return _processor(kind, image_processor, tokenizer, _QWEN_TEMPLATE, video=settings)


# LLaVA-OneVision: SigLIP, anyres-max tiles, Qwen2.
_ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _onevision_config(kind: str, tokenizer, text: dict) -> dict:
    token = tokenizer.convert_tokens_to_ids
    return dict(
        vision_config=_siglip(),
        text_config=_stock("Qwen2Config")(**text),
        image_token_id=token("<image>"),
        video_token_id=token("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=_pinpoints(28),
        **_special_ids(tokenizer),
    )


def _onevision_processor(kind: str, tokenizer):
    settings = dict(size={"height": 28, "width": 28}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor = _image_processor("LlavaOnevisionImageProcessor", image_grid_pinpoints=_pinpoints(28), **settings)
    return _processor(
        kind,
        image_processor,
        tokenizer,
        _ONEVISION_TEMPLATE,
        video=settings,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        image_token="<image>",
        video_token="<video>",
    )


# Idefics3 / SmolVLM: a SigLIP-like tower, pixel-shuffle connector, image splitting, Llama.
_IDEFICS3_SPECIALS = (
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _idefics3_config(kind: str, tokenizer, text: dict) -> dict:
    return dict(
        vision_config=dict(TINY_TOWER, image_size=28, patch_size=7),
        text_config=text,
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        **_special_ids(tokenizer),
    )


def _idefics3_processor(kind: str, tokenizer):
    settings = dict(
        size={"longest_edge": 56},
        max_image_size={"longest_edge": 28},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor = _image_processor(f"{_RECIPES[kind].stem}ImageProcessor", do_image_splitting=True, **settings)
    return _processor(kind, image_processor, tokenizer, _IDEFICS3_TEMPLATE, video=settings, image_seq_len=4)


# Gemma 3: SigLIP, sliding and global layers mixed (a 6-token window, shorter than every prompt).
_GEMMA3_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
_GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma3_config(kind: str, tokenizer, text: dict) -> dict:
    hidden, num_layers = text["hidden_size"], text["num_hidden_layers"]
    kinds = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (num_layers % 2)
    text = dict(
        text, head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, sliding_window=SLIDING_WINDOW, layer_types=kinds
    )
    token = tokenizer.convert_tokens_to_ids
    return dict(
        text_config=text,
        vision_config=_siglip(),
        mm_tokens_per_image=4,
        image_token_index=token("<image_soft_token>"),
        boi_token_index=token("<start_of_image>"),
        eoi_token_index=token("<end_of_image>"),
        **_special_ids(tokenizer),
    )


def _gemma3_processor(kind: str, tokenizer):
    image_processor = _image_processor("Gemma3ImageProcessor", size={"height": 28, "width": 28})
    return _processor(kind, image_processor, tokenizer, _GEMMA3_TEMPLATE, image_seq_length=4)


# Mistral 3: a Pixtral tower (2-D RoPE, any aspect), 2x2 spatial merge, Mistral decoder.
_MISTRAL3_SPECIALS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]")
_MISTRAL3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}[IMG]"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}[/INST]"
    "{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
)


def _mistral3_config(kind: str, tokenizer, text: dict) -> dict:
    return dict(
        vision_config=_stock("PixtralVisionConfig")(**TINY_TOWER, image_size=56, patch_size=7, head_dim=16),
        text_config=_stock("MistralConfig")(**text, sliding_window=None),  # as Mistral Small 3.1's: no window
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def _mistral3_processor(kind: str, tokenizer):
    """PixtralProcessor; without torchvision (which it imports), PixtralFiles, which saves the same files."""
    image_processor = _image_processor(
        "PixtralImageProcessor", size={"longest_edge": 56}, patch_size={"height": 14, "width": 14}
    )
    settings = dict(patch_size=7, spatial_merge_size=2, chat_template=_MISTRAL3_TEMPLATE)
    if _has_torchvision():
        return _stock("PixtralProcessor")(image_processor, tokenizer, **settings)
    return PixtralFiles(image_processor, tokenizer, **settings)


_RECIPES = {
    "llava_onevision": _Recipe(
        "LlavaOnevision", "qwen2", ("<video>", *_QWEN_SPECIALS[:2]), _onevision_config, _onevision_processor
    ),
    "qwen2_vl": _Recipe("Qwen2VL", "qwen2", _QWEN_SPECIALS, _qwen_vl_config, _qwen_vl_processor),
    "qwen2_5_vl": _Recipe("Qwen2_5_VL", "qwen2", _QWEN_SPECIALS, _qwen_vl_config, _qwen_vl_processor),
    "qwen3_vl": _Recipe("Qwen3VL", "qwen2", _QWEN_SPECIALS, _qwen_vl_config, _qwen_vl_processor),
    "idefics3": _Recipe("Idefics3", "llama", _IDEFICS3_SPECIALS, _idefics3_config, _idefics3_processor),
    "smolvlm": _Recipe("SmolVLM", "llama", _IDEFICS3_SPECIALS, _idefics3_config, _idefics3_processor),
    "gemma3": _Recipe(
        "Gemma3",
        "gemma3",
        (*_GEMMA3_NAMED.values(), "<start_of_turn>", "<end_of_turn>"),
        _gemma3_config,
        _gemma3_processor,
        named=_GEMMA3_NAMED,
    ),
    "mistral3": _Recipe("Mistral3", "mistral", _MISTRAL3_SPECIALS, _mistral3_config, _mistral3_processor),
}


# Shared by the families.


def _text_settings(tokenizer, hidden: int, num_layers: int, kv_heads: int, init_std: float) -> dict:
    """The tiny language model's shape, shared by every family: 4 heads, ``kv_heads`` key/value heads."""
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=init_std,
    )


def _siglip():
    """A tiny SigLIP tower (LLaVA-OneVision's and Gemma 3's): 28 px images, 7 px patches, no pooling head."""
    return _stock("SiglipVisionConfig")(**TINY_TOWER, image_size=28, patch_size=7, vision_use_head=False)


def _pinpoints(side: int) -> list[list[int]]:
    """Anyres grid shapes (LLaVA-NeXT, LLaVA-OneVision): 1x2, 2x1 and 2x2 tiles of ``side`` pixels."""
    return [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]


def _mrope(head_dim: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) over head_dim / 2 frequencies, in Qwen2-VL's 2:3:3 proportion."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _special_ids(tokenizer) -> dict:
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _stock(name: str):
    """transformers' class ``name`` (imported on first use: importing this module stays cheap)."""
    import transformers

    return getattr(transformers, name)


def _has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _image_processor(name: str, **kwargs):
    """The family's image processor; the PIL one where torchvision (the default backend) is missing."""
    if not _has_torchvision():
        import transformers

        pil = getattr(transformers, name.replace("ImageProcessor", "ImageProcessorPil"), None)
        if pil is not None:
            return pil(**kwargs)
    return _stock(name)(**kwargs)


def _processor(kind: str, image_processor, tokenizer, chat_template: str, video: dict | None = None, **settings):
    """The family's processor ({stem}Processor), its video processor (if it has one) made with the ``video``
    settings. Without torchvision, which video processors import, the same class without it (see
    ``load.image_only_processor``), whose ``save_pretrained`` also writes the video processor's file as the stock
    processor would (``_video_processor_file``), so the folder is complete either way."""
    name = f"{_RECIPES[kind].stem}Processor"
    if not families.family(kind).video_processor:
        return _stock(name)(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **settings
        )
    if _has_torchvision():
        return _stock(name)(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=_stock(_video_processor_name(kind))(**(video or {})),
            chat_template=chat_template,
            **settings,
        )
    from .load import image_only_processor_class

    processor = image_only_processor_class(name)(image_processor, tokenizer, chat_template=chat_template, **settings)
    processor.save_pretrained = _with_video_processor(processor.save_pretrained, kind)
    return processor


def _video_processor_name(kind: str) -> str:
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    name = VIDEO_PROCESSOR_MAPPING_NAMES[kind]  # {"torchvision": name} since 5.x, a name before
    return name["torchvision"] if isinstance(name, dict) else name


# What the stock video processor of each tiny family saves (the "video_processor" entry of processor_config.json),
# recorded on a machine with torchvision by scripts/record_tiny_video_processors.py (tests/test_tiny.py checks it
# is current where torchvision is installed).
VIDEO_PROCESSORS = Path(__file__).with_name("tiny_video_processors.json")


def _with_video_processor(save_pretrained, kind: str):
    """``save_pretrained`` that adds the video processor entry to processor_config.json, as the stock one does."""

    def save(path, *args, **kwargs):
        out = save_pretrained(path, *args, **kwargs)
        file = Path(path) / "processor_config.json"
        config = json.loads(file.read_text())
        config["video_processor"] = json.loads(VIDEO_PROCESSORS.read_text())[kind]
        file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out

    return save


class PixtralFiles:
    """Mistral 3's processor files without the processor: PixtralProcessor imports torchvision, so where it is
    missing the tiny checkpoint is saved with its image processor, tokenizer, chat template and the
    ``processor_config.json`` PixtralProcessor would write (a machine with torchvision loads it with
    AutoProcessor); ``load.load_processor`` builds a processor that processes like it from these files."""

    def __init__(self, image_processor, tokenizer, chat_template, **settings):  # PixtralProcessor's arguments
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.settings = dict(
            settings, image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]"
        )

    def save_pretrained(self, path):
        path = Path(path)
        self.tokenizer._set_processor_class("PixtralProcessor")  # as ProcessorMixin.save_pretrained does
        self.tokenizer.save_pretrained(path)
        image = self.image_processor.to_dict()
        image["image_processor_type"] = "PixtralImageProcessor"
        config = {"processor_class": "PixtralProcessor", "image_processor": image, **self.settings}
        (path / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (path / "chat_template.jinja").write_text(self.chat_template)
