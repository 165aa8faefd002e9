from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

warnings.filterwarnings("ignore", message=".*torchvision.*")

from shortv_export.data import NESTED_IMAGES  # noqa: E402
from shortv_export.tiny import NEW_FAMILIES, save_tiny  # noqa: E402

_ROOT: Path | None = None


@pytest.fixture(scope="session", autouse=True)
def _tiny_root(tmp_path_factory):
    global _ROOT
    _ROOT = tmp_path_factory.mktemp("tiny")
    yield


@cache
def tiny_dir(kind: str, num_layers: int = 6, text: str = "llama", kv_heads: int = 2) -> Path:
    """A tiny random checkpoint folder of ``kind`` ('llava', 'llava_next' or one of ``tiny.NEW_FAMILIES``) with
    text model ``text`` (one of ``tiny.TEXT_KINDS``; the new families' own) and ``kv_heads`` key/value heads (of
    4), saved once per session."""
    name = f"{kind}-{text}-{num_layers}" + ("" if kv_heads == 2 else f"-kv{kv_heads}")
    if kind in NEW_FAMILIES:
        text = None if text in ("llama", "qwen2", "gemma3") else text
    return save_tiny(_ROOT / name, kind, num_layers=num_layers, text=text, kv_heads=kv_heads)


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def prompt(processor, text: str, n_images: int = 1) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def batch(processor, rows: list[tuple[str, list[Image.Image]]], padding_side: str = "left") -> dict:
    """Processor inputs for rows of (question, images); rows may have zero, one or several images."""
    processor.tokenizer.padding_side = padding_side
    texts = [prompt(processor, q, len(imgs)) for q, imgs in rows]
    if type(processor).__name__ in NESTED_IMAGES:  # images listed per row
        images = [imgs for _, imgs in rows] if any(imgs for _, imgs in rows) else None
    else:
        images = [img for _, imgs in rows for img in imgs] or None
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


class PixtralStandIn:
    """What PixtralProcessor does (Mistral 3), for machines without torchvision, which it needs to import: each
    ``[IMG]`` of the prompt becomes one ``[IMG]`` per merged patch, ``[IMG_BREAK]`` after each row, ``[IMG_END]``
    after the last; images through the PIL image processor saved with the checkpoint."""

    def __init__(self, folder: Path):
        import json

        from transformers import AutoTokenizer, PixtralImageProcessorPil

        settings = json.loads((folder / "processor_config.json").read_text())
        image = {k: v for k, v in settings["image_processor"].items() if k != "image_processor_type"}
        self.image_processor = PixtralImageProcessorPil(**image)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.chat_template = (folder / "chat_template.jinja").read_text()
        self.unit = settings["patch_size"] * settings["spatial_merge_size"]

    def apply_chat_template(self, conversation, add_generation_prompt=False, **kwargs):
        return self.tokenizer.apply_chat_template(
            conversation, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def __call__(self, images=None, text=None, return_tensors="pt", padding=False, **kwargs):
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        pixels = {}
        if images:
            pixels = dict(self.image_processor(images=images, return_tensors="pt"))
            sizes = iter(pixels["image_sizes"].tolist())
            expanded = []
            for t in texts:
                head, *rest = t.split("[IMG]")
                for tail in rest:
                    h, w = next(sizes)
                    rows = [["[IMG]"] * (w // self.unit) + ["[IMG_BREAK]"] for _ in range(h // self.unit)]
                    rows[-1][-1] = "[IMG_END]"
                    head += "".join(tok for row in rows for tok in row) + tail
                expanded.append(head)
            texts = expanded
        encoded = self.tokenizer(texts, return_tensors=return_tensors, padding=padding)
        return BatchFeature({**encoded, **pixels})


def processor_for(folder: Path):
    """The checkpoint's processor as the tool loads it; Mistral 3's stand-in where PixtralProcessor cannot load."""
    from shortv_export.errors import ShortVError
    from shortv_export.load import load_processor

    try:
        return load_processor(folder)
    except ShortVError:
        if "mistral3" not in (folder / "config.json").read_text():
            raise
        return PixtralStandIn(folder)
