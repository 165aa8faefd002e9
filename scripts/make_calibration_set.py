"""Regenerate the embedded calibration set (shortv_export/calib/) from photographs shipped in PyPI packages.

pip install scikit-image matplotlib && python scripts/make_calibration_set.py
"""

import json
from pathlib import Path

import matplotlib.cbook
import numpy as np
import skimage.data as sd
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "shortv_export" / "calib"
SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION = "Provide a one-sentence caption for the provided image."
PHOTOS = {  # name -> (pixels, two short-answer questions); licenses in calib/LICENSES.md
    "astronaut": (sd.astronaut, ["What is the person wearing?", "What flag is behind the person?"]),
    "cat": (sd.chelsea, ["What animal is this?", "What color are the animal's eyes?"]),
    "coffee": (sd.coffee, ["What drink is in the cup?", "What is the cup standing on?"]),
    "rocket": (sd.rocket, ["What is taking off?", "Is it day or night?"]),
    "hubble": (sd.hubble_deep_field, ["What do the bright spots show?", "What color is the background?"]),
    "retina": (sd.retina, ["Which part of the body is shown?", "What is the main color of the image?"]),
    "cameraman": (sd.camera, ["What is the man holding?", "Is this photo in color?"]),
    "grace_hopper": (
        lambda: np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))),
        ["What kind of uniform is the person wearing?", "Is the person smiling?"],
    ),
    "bricks": (sd.brick, ["What is the wall made of?", "What color are the bricks?"]),
    "grass": (sd.grass, ["What plant is this?", "What color is it?"]),
}

if __name__ == "__main__":
    questions, captions, crops = [], [], []
    for name, (pixels, qs) in PHOTOS.items():
        img = Image.fromarray(pixels()).convert("RGB")
        img.thumbnail((336, 336))
        img.save(OUT / f"{name}.jpg", quality=88)
        w, h = img.size
        img.crop((w // 5, h // 5, w - w // 5, h - h // 5)).save(OUT / f"{name}_crop.jpg", quality=88)
        questions += [{"image": f"{name}.jpg", "prompt": q + SUFFIX} for q in qs]
        captions.append({"image": f"{name}.jpg", "prompt": CAPTION})
        crops.append({"image": f"{name}_crop.jpg", "prompt": CAPTION})
    with open(OUT / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in questions + captions + crops)
    print(f"wrote {len(questions + captions + crops)} samples to {OUT}")
