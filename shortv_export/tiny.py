"""Tiny, randomly initialised checkpoints of every supported family, built offline.

LLaVA / LLaVA-NeXT have the real architecture (CLIP vision tower, projector, a Llama, Mistral or Qwen2 decoder
with grouped-query attention; the ``*_sliding`` text kinds use a 6-token sliding window, shorter than every test
prompt). LLaVA-OneVision (SigLIP, anyres-max, Qwen2), Qwen2-VL / Qwen2.5-VL (their own vision towers, M-RoPE,
q/k/v biases) and Idefics3 / SmolVLM (SigLIP-like tower, pixel-shuffle connector, image splitting, Llama) are
built from their stock configs at toy sizes. Each has a real processor (the family's image processor and
processor class, a word-level tokenizer with the family's special tokens, a chat template in the family's
format) and is saved with ``save_pretrained``, so it exercises the same loading code as a Hub checkpoint.
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
    vision = CLIPVisionConfig(**TINY_TOWER, image_size=image_size, patch_size=patch, projection_dim=32)
    text_model = text_config(text, **_text_settings(tokenizer, hidden, num_layers, kv_heads, init_std))
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
    model, processor = build_family(kind, **kwargs) if kind in NEW_FAMILIES else build_tiny(kind, **kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# The families beyond LLaVA / LLaVA-NeXT: their placeholder tokens and chat formats.
_QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
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
_GEMMA3_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
_GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_MISTRAL3_SPECIALS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]")
_MISTRAL3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}[IMG]"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}[/INST]"
    "{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
)
NEW_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm", "gemma3", "mistral3")


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
    import importlib.util

    import transformers

    own = {"idefics3": "llama", "smolvlm": "llama", "gemma3": "gemma3", "mistral3": "mistral"}.get(kind, "qwen2")
    if text not in (None, own):
        raise ValueError(f"{kind} has its own text model, not {text!r}")
    specials = {
        "qwen2_vl": _QWEN_SPECIALS,
        "qwen2_5_vl": _QWEN_SPECIALS,
        "qwen3_vl": _QWEN_SPECIALS,
        "llava_onevision": ("<video>", *_QWEN_SPECIALS[:2]),
        "gemma3": (*_GEMMA3_NAMED.values(), "<start_of_turn>", "<end_of_turn>"),
        "mistral3": _MISTRAL3_SPECIALS,
    }
    tokenizer = make_tokenizer(specials.get(kind, _IDEFICS3_SPECIALS), _GEMMA3_NAMED if kind == "gemma3" else None)
    token = tokenizer.convert_tokens_to_ids
    text = _text_settings(tokenizer, hidden, num_layers, kv_heads, init_std)
    torch.manual_seed(seed)
    if kind in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        head_dim = hidden // 4
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(head_dim)}
        vision = dict(depth=2, num_heads=2, patch_size=7, spatial_merge_size=2, temporal_patch_size=2)
        if kind == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=hidden, mlp_ratio=2)
        elif kind == "qwen2_5_vl":
            vision.update(
                hidden_size=32, intermediate_size=64, out_hidden_size=hidden, window_size=28, fullatt_block_indexes=[1]
            )
        else:  # interleaved M-RoPE (t, h, w alternate over the frequencies); deepstack from both vision layers
            text["head_dim"] = head_dim
            text["rope_parameters"].update(
                mrope_section=[head_dim // 4, head_dim // 8, head_dim // 8], mrope_interleaved=True
            )
            vision.update(
                hidden_size=32,
                intermediate_size=64,
                out_hidden_size=hidden,
                num_position_embeddings=16,
                deepstack_visual_indexes=[0, 1],
            )
        names = {
            "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
            "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
            "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
        }[kind]
        config = getattr(transformers, names[0])(
            text_config=text,
            vision_config=vision,
            image_token_id=token("<|image_pad|>"),
            video_token_id=token("<|video_pad|>"),
            vision_start_token_id=token("<|vision_start|>"),
            vision_end_token_id=token("<|vision_end|>"),
            **_special_ids(tokenizer),
        )
        model = getattr(transformers, names[1])(config)
        image_processor = _image_processor(
            "Qwen2VLImageProcessor",
            size={"shortest_edge": 4 * 14 * 14, "longest_edge": 16 * 14 * 14},
            patch_size=7,
            merge_size=2,
            temporal_patch_size=2,
        )
        processor = _image_only(names[2], image_processor, tokenizer, _QWEN_TEMPLATE)
    elif kind == "llava_onevision":
        vision = _siglip()
        pinpoints = [[28, 56], [56, 28], [56, 56]]
        config = transformers.LlavaOnevisionConfig(
            vision_config=vision,
            text_config=transformers.Qwen2Config(**text),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_id=token("<video>"),
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=pinpoints,
            **_special_ids(tokenizer),
        )
        model = transformers.LlavaOnevisionForConditionalGeneration(config)
        image_processor = _image_processor(
            "LlavaOnevisionImageProcessor",
            size={"height": 28, "width": 28},
            image_grid_pinpoints=pinpoints,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        processor = _image_only(
            "LlavaOnevisionProcessor",
            image_processor,
            tokenizer,
            _ONEVISION_TEMPLATE,
            num_image_tokens=16,
            vision_feature_select_strategy="full",
            image_token="<image>",
            video_token="<video>",
        )
    elif kind in ("idefics3", "smolvlm"):
        prefix = "Idefics3" if kind == "idefics3" else "SmolVLM"
        vision = dict(TINY_TOWER, image_size=28, patch_size=7)
        config = getattr(transformers, f"{prefix}Config")(
            vision_config=vision,
            text_config=text,
            scale_factor=2,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            **_special_ids(tokenizer),
        )
        model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
        image_processor = _image_processor(
            f"{prefix}ImageProcessor",
            size={"longest_edge": 56},
            max_image_size={"longest_edge": 28},
            do_image_splitting=True,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
        extra = {} if kind == "idefics3" else {"video_processor": None}
        processor = _image_only(
            f"{prefix}Processor", image_processor, tokenizer, _IDEFICS3_TEMPLATE, image_seq_len=4, **extra
        )
    elif kind == "gemma3":  # sliding and global layers mixed; a 6-token window, shorter than every prompt
        kinds = ["sliding_attention", "full_attention"] * (num_layers // 2) + ["sliding_attention"] * (num_layers % 2)
        text.update(
            head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4, sliding_window=SLIDING_WINDOW, layer_types=kinds
        )
        vision = _siglip()
        config = transformers.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=token("<image_soft_token>"),
            boi_token_index=token("<start_of_image>"),
            eoi_token_index=token("<end_of_image>"),
            **_special_ids(tokenizer),
        )
        model = transformers.Gemma3ForConditionalGeneration(config)
        image_processor = _image_processor("Gemma3ImageProcessor", size={"height": 28, "width": 28})
        processor = transformers.Gemma3Processor(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=_GEMMA3_TEMPLATE, image_seq_length=4
        )
    elif kind == "mistral3":  # Pixtral tower (2-D RoPE, any aspect), 2x2 spatial merge, Mistral decoder
        vision = transformers.PixtralVisionConfig(**TINY_TOWER, image_size=56, patch_size=7, head_dim=16)
        config = transformers.Mistral3Config(
            vision_config=vision,
            text_config=transformers.MistralConfig(**text),
            image_token_index=token("[IMG]"),
            spatial_merge_size=2,
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
        model = transformers.Mistral3ForConditionalGeneration(config)
        image_processor = _image_processor(
            "PixtralImageProcessor", size={"longest_edge": 56}, patch_size={"height": 14, "width": 14}
        )
        settings = dict(patch_size=7, spatial_merge_size=2, chat_template=_MISTRAL3_TEMPLATE)
        if importlib.util.find_spec("torchvision") is not None:
            processor = transformers.PixtralProcessor(image_processor, tokenizer, **settings)
        else:
            processor = PixtralFiles(image_processor, tokenizer, **settings)
    else:
        raise ValueError(f"kind must be one of {', '.join(('llava', 'llava_next', *NEW_FAMILIES))}, got {kind!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), processor


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
    import transformers

    return transformers.SiglipVisionConfig(**TINY_TOWER, image_size=28, patch_size=7, vision_use_head=False)


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


def _image_processor(name: str, **kwargs):
    """The family's image processor; the PIL one where torchvision (the default backend) is missing."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None:
        pil = getattr(transformers, name.replace("ImageProcessor", "ImageProcessorPil"), None)
        if pil is not None:
            return pil(**kwargs)
    return getattr(transformers, name)(**kwargs)


def _image_only(name: str, image_processor, tokenizer, chat_template: str, **kwargs):
    """The family's processor; without torchvision, the same class without its video processor (see
    ``load.image_only_processor``), which saves the same files."""
    import importlib.util

    import transformers

    kwargs.pop("video_processor", None)
    if importlib.util.find_spec("torchvision") is not None:
        return getattr(transformers, name)(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
        )
    if name == "Idefics3Processor":  # no video processor
        return transformers.Idefics3Processor(image_processor, tokenizer, chat_template=chat_template, **kwargs)
    from .load import image_only_processor_class

    return image_only_processor_class(name)(image_processor, tokenizer, chat_template=chat_template, **kwargs)


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
        import json

        path = Path(path)
        self.tokenizer.save_pretrained(path)
        image = self.image_processor.to_dict()
        image["image_processor_type"] = "PixtralImageProcessor"
        config = {"processor_class": "PixtralProcessor", "image_processor": image, **self.settings}
        (path / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (path / "chat_template.jinja").write_text(self.chat_template)
