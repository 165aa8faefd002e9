"""Write a tiny random LLaVA (or LLaVA-NeXT) checkpoint folder, offline, for demos and tests.

python scripts/make_tiny_llava.py tiny-llava [--kind llava_next] [--text mistral_sliding] [--layers 12]
"""

import argparse

from shortv_export.tiny import TEXT_KINDS, save_tiny

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--kind", choices=["llava", "llava_next"], default="llava")
    parser.add_argument("--text", choices=TEXT_KINDS, default="llama", help="language model (sliding: 6-token window)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = save_tiny(args.out, args.kind, num_layers=args.layers, seed=args.seed, text=args.text)
    print(f"wrote {path}")
