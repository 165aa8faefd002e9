"""The README's prefill FLOPs table: vanilla vs ShortV with the published layer lists (method.md section 4).

python scripts/flops_table.py [--text-tokens 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shortv_export.flops import flops_summary  # noqa: E402
from shortv_export.select import PAPER_LAYERS  # noqa: E402

SEVEN_B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32}
THIRTEEN_B = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_hidden_layers": 40}
MODELS = [  # (Hub id, language model shape, visual tokens of one image)
    ("llava-hf/llava-1.5-7b-hf", SEVEN_B, 576),
    ("llava-hf/llava-1.5-13b-hf", THIRTEEN_B, 576),
    ("llava-hf/llava-v1.6-vicuna-7b-hf", SEVEN_B, 2880),
    ("llava-hf/llava-v1.6-vicuna-13b-hf", THIRTEEN_B, 2880),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    print("| model | visual + text tokens | frozen (paper) | vanilla TFLOPs | ShortV TFLOPs | ratio | ideal speed-up |")
    print("|---|---|---|---|---|---|---|")
    for repo_id, shape, n_visual in MODELS:
        layers = PAPER_LAYERS[repo_id]
        f = flops_summary(shape, n_visual, args.text_tokens, layers)
        print(
            f"| {repo_id.split('/')[1]} | {n_visual} + {args.text_tokens} | {len(layers)} / "
            f"{shape['num_hidden_layers']} | {f['vanilla_tflops']:.2f} | {f['shortv_tflops']:.2f} | "
            f"{f['ratio']:.3f} | {f['ideal_speedup']:.2f}x |"
        )


if __name__ == "__main__":
    main()
