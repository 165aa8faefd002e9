"""Write a tiny random checkpoint folder of a supported family, offline, for demos and tests.

python scripts/make_tiny_llava.py tiny-llava [--kind KIND] [--text mistral_sliding] [--layers 12]

KIND: llava (default), llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, idefics3, smolvlm, gemma3,
mistral3.

--text picks the language model of llava / llava_next; the other families have their own.
"""

import argparse
import importlib.util
import sys

from shortv_export.families import FAMILIES
from shortv_export.tiny import NEW_FAMILIES, TEXT_KINDS, save_tiny

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--kind", choices=["llava", "llava_next", *NEW_FAMILIES], default="llava")
    parser.add_argument("--text", choices=TEXT_KINDS, default=None, help="language model (sliding: 6-token window)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    missing = [m for m in FAMILIES[args.kind].processor_needs if importlib.util.find_spec(m) is None]
    if missing:  # the family's processor imports them: say so in one line rather than a traceback
        extra = f" (or pip install 'shortv-export[{args.kind}]')" if args.kind == "smolvlm" else ""
        print(
            f"Error: --kind {args.kind}: its processor needs {', '.join(missing)}: pip install "
            f"{' '.join(missing)}{extra}",
            file=sys.stderr,
        )
        sys.exit(2)
    text = args.text or ("llama" if args.kind in ("llava", "llava_next") else None)
    path = save_tiny(args.out, args.kind, num_layers=args.layers, seed=args.seed, text=text)
    print(f"wrote {path}")
