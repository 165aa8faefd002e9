"""Record what the stock video processor of each tiny family saves, for tiny checkpoints built without torchvision.

Run on a machine with torchvision (video processors import it), e.g. on x86_64
``pip install torch==2.14.1 torchvision==0.29.1 -e .``, then ``python scripts/record_tiny_video_processors.py``.
It rewrites ``shortv_export/tiny_video_processors.json``: for each family whose processor has a video processor,
the ``video_processor`` entry the stock processor writes into ``processor_config.json``.
"""

import json
import tempfile
from pathlib import Path

from shortv_export import families, tiny

if __name__ == "__main__":
    if not tiny._has_torchvision():
        raise SystemExit("torchvision is not installed: the stock video processors cannot be made here")
    recorded = {}
    for kind in families.FAMILIES:
        if families.family(kind).video_processor:
            with tempfile.TemporaryDirectory() as folder:
                tiny.build_family(kind)[1].save_pretrained(folder)
                recorded[kind] = json.loads((Path(folder) / "processor_config.json").read_text())["video_processor"]
    tiny.VIDEO_PROCESSORS.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    print(f"wrote {tiny.VIDEO_PROCESSORS} ({', '.join(recorded)})")
