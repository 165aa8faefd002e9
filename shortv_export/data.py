"""Calibration data: the embedded default set, a JSONL file, a folder of images, or a `datasets` dataset.

Every sample keeps its prompt with its own image. Choosing ``samples`` of them is seeded and deterministic.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ShortVError

DEFAULT_DIR = Path(__file__).resolve().parent / "calib"
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FALLBACK_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


@dataclass(frozen=True)
class Sample:
    image: Any  # a path, or an already decoded PIL image (datasets)
    prompt: str
    origin: str  # where it came from, for error messages ("calib.jsonl:3")

    def load_image(self):
        from PIL import Image

        if not isinstance(self.image, (str, Path)):
            return self.image.convert("RGB")
        path = Path(self.image)
        if not path.is_file():
            raise ShortVError(f"calibration image {path} not found ({self.origin})")
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except Exception as err:  # PIL raises many types for broken files
            raise ShortVError(f"calibration image {path} cannot be read: {err} ({self.origin})") from None


@dataclass(frozen=True)
class CalibrationSet:
    name: str  # "default", a path, or "hf:NAME:split"
    samples: list[Sample]
    seed: int

    def fingerprint(self) -> str:
        """A hash of the prompts and image bytes, to tell whether a stored LC came from the same set."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(s.prompt.encode())
            if isinstance(s.image, (str, Path)) and Path(s.image).is_file():
                h.update(hashlib.sha256(Path(s.image).read_bytes()).digest())
            else:
                h.update(s.load_image().tobytes())
        return h.hexdigest()[:16]


def load_calibration(
    spec: str | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
    image_column: str = "image",
    prompt_column: str | None = None,
) -> CalibrationSet:
    """Resolve ``--calib``: None (embedded default), FILE.jsonl, a folder of images, or ``hf:NAME[:split]``."""
    if spec is None or spec == "default":
        name, items = "default", _read_jsonl(DEFAULT_DIR / "samples.jsonl")
    elif spec.startswith("hf:"):
        name, items = spec, _read_hf(spec[3:], image_column, prompt_column)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            items = [Sample(p, CAPTION_PROMPT, str(p)) for p in images]
        elif path.is_file():
            items = _read_jsonl(path)
        else:
            raise ShortVError(f"--calib {spec}: no such file or folder")
        name = str(path)
    if not items:
        raise ShortVError(f"calibration set {name} is empty")
    if samples is not None:
        if samples < 1:
            raise ShortVError(f"--samples {samples}: must be at least 1")
        if samples > len(items):
            raise ShortVError(f"--samples {samples}: the calibration set {name} has {len(items)} samples")
        if samples < len(items):
            chosen = sorted(random.Random(seed).sample(range(len(items)), samples))
            items = [items[i] for i in chosen]
    return CalibrationSet(name, items, seed)


def _read_jsonl(path: Path) -> list[Sample]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ShortVError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise ShortVError(f'{where}: expected {{"image": path, "prompt": text}}')
        items.append(Sample(path.parent / row["image"], row["prompt"], where))
    return items


def _read_hf(spec: str, image_column: str, prompt_column: str | None) -> list[Sample]:
    try:
        import datasets
    except ImportError:
        raise ShortVError("--calib hf:... needs the datasets package: pip install 'shortv-export[datasets]'") from None
    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:
        raise ShortVError(f"--calib hf:{spec}: cannot load the dataset ({err})") from None
    missing = [c for c in (image_column, prompt_column) if c and c not in ds.column_names]
    if missing:
        raise ShortVError(f"--calib hf:{spec}: no column {missing[0]!r}; columns: {', '.join(ds.column_names)}")
    return [
        Sample(row[image_column], row[prompt_column] if prompt_column else CAPTION_PROMPT, f"hf:{spec}[{i}]")
        for i, row in enumerate(ds)
    ]


def format_prompt(processor, prompt: str) -> str:
    """The prompt in the checkpoint's own chat template, with one image and the generation prompt, no answer."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    warnings.warn(
        "the checkpoint has no chat template; calibration prompts use 'USER: <image>\\n... ASSISTANT:'",
        UserWarning,
        stacklevel=2,
    )
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def token_counts(processor, calib: CalibrationSet, image_token_id: int) -> tuple[float, float]:
    """Mean visual and text tokens per sample, as calibration sees them (chat template, processor), without a
    model: what the FLOPs of a dry run are counted at."""
    visual = text = 0
    for s in calib.samples:
        ids = processor(images=[s.load_image()], text=[format_prompt(processor, s.prompt)], return_tensors="np")
        ids = ids["input_ids"][0]
        n_image = int((ids == image_token_id).sum())
        visual, text = visual + n_image, text + len(ids) - n_image
    return visual / len(calib.samples), text / len(calib.samples)


# processors that take a list of images per prompt
NESTED_IMAGES = ("Idefics3Processor", "SmolVLMProcessor", "Gemma3Processor")


def prompt_batch(processor, samples: list[Sample]) -> dict:
    """Processor inputs (torch) for ``samples``, left-padded so the last position is every row's last prompt
    token, each prompt in the chat template with its own image."""
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    images = [s.load_image() for s in samples]
    if type(processor).__name__ in NESTED_IMAGES:
        images = [[image] for image in images]
    try:
        return dict(
            processor(
                images=images,
                text=[format_prompt(processor, s.prompt) for s in samples],
                return_tensors="pt",
                padding=True,
            )
        )
    finally:
        tok.padding_side = side
