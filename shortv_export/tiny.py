"""Tiny, randomly initialised LLaVA / LLaVA-NeXT checkpoints built offline.

They have the real architecture (CLIP vision tower, projector, a Llama, Mistral or Qwen2 decoder with grouped-query
attention; the ``*_sliding`` text kinds use a 6-token sliding window, shorter than every test prompt),
a real processor (image processor + word-level tokenizer + chat template) and are saved with
``save_pretrained``, so they exercise the same loading code as a llava-hf checkpoint from the Hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

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


def make_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + sorted({w.lower() for w in _WORDS}))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )


SLIDING_WINDOW = 6
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
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tokenizer = make_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
        projection_dim=32,
    )
    text_model = text_config(
        text,
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
    common = dict(
        vision_config=vision,
        text_config=text_model,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    image_kwargs = dict(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    proc_kwargs = dict(
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    if kind == "llava":
        config = LlavaConfig(**common, image_seq_length=(image_size // patch) ** 2)
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(**image_kwargs), **proc_kwargs)
    elif kind == "llava_next":
        pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
        config = LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        model = LlavaNextForConditionalGeneration(config)
        image_processor = LlavaNextImageProcessor(**image_kwargs, image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=image_processor, **proc_kwargs)
    else:
        raise ValueError(f"kind must be 'llava' or 'llava_next', got {kind!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def save_tiny(path: str | Path, kind: str = "llava", **kwargs) -> Path:
    """Build a tiny checkpoint and save it like a Hub repo (safetensors, processor, chat template)."""
    path = Path(path)
    model, processor = build_tiny(kind, **kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
