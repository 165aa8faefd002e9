"""The README's prefill FLOPs tables: vanilla vs ShortV with the published layer lists (docs/method.md section 4),
and for the other supported families at N = 60% of the layers (the paper's share).

python scripts/flops_table.py [--text-tokens 64]

The other families' language-model shapes are their Hub config.json text_config values, entered by hand (no
download, no weights): check one against `shortv-export REPO --dry-run`, which reads the real config.
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


def _shape(hidden, ffn, heads, kv_heads, layers, head_dim=None):
    return {
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers,
        "head_dim": head_dim,
    }


QWEN2_7B = _shape(3584, 18944, 28, 4, 28)
OTHER_FAMILIES = [  # (Hub id, language model shape, visual tokens of one typical image, how)
    ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", _shape(896, 4864, 14, 2, 24), 5 * 729, "base + 2x2 tiles of 729"),
    ("llava-hf/llava-onevision-qwen2-7b-ov-hf", QWEN2_7B, 5 * 729, "base + 2x2 tiles of 729"),
    ("Qwen/Qwen2-VL-2B-Instruct", _shape(1536, 8960, 12, 2, 28), 256, "448x448"),
    ("Qwen/Qwen2-VL-7B-Instruct", QWEN2_7B, 256, "448x448"),
    ("Qwen/Qwen2.5-VL-3B-Instruct", _shape(2048, 11008, 16, 2, 36), 256, "448x448"),
    ("Qwen/Qwen2.5-VL-7B-Instruct", QWEN2_7B, 256, "448x448"),
    ("Qwen/Qwen3-VL-2B-Instruct", _shape(2048, 6144, 16, 8, 28, 128), 196, "448x448"),
    ("Qwen/Qwen3-VL-8B-Instruct", _shape(4096, 12288, 32, 8, 36, 128), 196, "448x448"),
    ("HuggingFaceM4/Idefics3-8B-Llama3", _shape(4096, 14336, 32, 8, 32), 5 * 169, "2x2 split + global, 169 each"),
    ("HuggingFaceTB/SmolVLM-256M-Instruct", _shape(576, 1536, 9, 3, 30), 5 * 64, "2x2 split + global, 64 each"),
    ("HuggingFaceTB/SmolVLM-500M-Instruct", _shape(960, 2560, 15, 5, 32), 5 * 64, "2x2 split + global, 64 each"),
    ("HuggingFaceTB/SmolVLM-Instruct", _shape(2048, 8192, 32, 32, 24), 5 * 81, "2x2 split + global, 81 each"),
    ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", _shape(5120, 32768, 32, 8, 40, 128), 1296, "1024x1024"),
    ("google/gemma-3-4b-it", _shape(2560, 10240, 8, 4, 34, 256), 256, "896x896"),
    ("google/gemma-3-12b-it", _shape(3840, 15360, 16, 8, 48, 256), 256, "896x896"),
    ("google/gemma-3-27b-it", _shape(5376, 21504, 32, 16, 62, 128), 256, "896x896"),
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
    print()
    print(
        "| model | visual tokens (one image) + text | frozen (60%) | vanilla TFLOPs | ShortV TFLOPs | ratio "
        "| ideal speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for repo_id, shape, n_visual, how in OTHER_FAMILIES:
        total = shape["num_hidden_layers"]
        n = round(0.6 * total)
        f = flops_summary(shape, n_visual, args.text_tokens, range(n))
        print(
            f"| {repo_id.split('/')[1]} | {n_visual} ({how}) + {args.text_tokens} | {n} / {total} | "
            f"{f['vanilla_tflops']:.3f} | {f['shortv_tflops']:.3f} | {f['ratio']:.3f} | {f['ideal_speedup']:.2f}x |"
        )

    print()
    pruning_tables(args.text_tokens)


VTW_K = {"llava-hf/llava-1.5-7b-hf": 16, "llava-hf/llava-1.5-13b-hf": 20}  # the paper's: 16 for 7B, 20 for 13B
VTW_K |= {"llava-hf/llava-v1.6-vicuna-7b-hf": 16, "llava-hf/llava-v1.6-vicuna-13b-hf": 20}


def pruning_tables(text_tokens: int) -> None:
    """Paper Table 1's FastV and VTW rows, ShortV + FastV, and the K:R of Table 5's 29% (docs/method.md section 5)."""
    fastv = {"method": "fastv", "layer": 2, "ratio": 0.5}
    print("| model | vanilla TFLOPs | FastV K=2 R=50% | VTW | ShortV (paper N) | ShortV + FastV K=2 R=50% |")
    print("|---|---|---|---|---|---|")
    for repo_id, shape, n_visual in MODELS:
        layers, k = PAPER_LAYERS[repo_id], VTW_K[repo_id]
        vtw = {"method": "vtw", "layer": k}
        cells = [
            flops_summary(shape, n_visual, text_tokens, *c)
            for c in (([], fastv), ([], vtw), (layers, None), (layers, fastv))
        ]
        row = [f"{c['shortv_tflops']:.2f} ({c['ratio']:.1%})" for c in cells]
        row[1] = f"K={k}: {row[1]}"
        print(f"| {repo_id.split('/')[1]} | {cells[0]['vanilla_tflops']:.2f} | " + " | ".join(row) + " |")
    print()
    repo = "llava-hf/llava-1.5-7b-hf"
    shape, n_visual = MODELS[0][1], MODELS[0][2]
    grid = [(k, r / 100) for k in range(1, 9) for r in range(5, 100, 5)]
    ratios = {
        (k, r): flops_summary(
            shape, n_visual, text_tokens, PAPER_LAYERS[repo], {"method": "fastv", "layer": k, "ratio": r}
        )["ratio"]
        for k, r in grid
    }
    print("Table 5 (LLaVA-1.5-7B, ShortV N=19 + FastV; the paper gives 29% but not its K, R):")
    print(f"  K=2 R=50%: {ratios[(2, 0.5)]:.1%}")
    at_k2 = sorted((kr for kr in ratios if kr[0] == 2), key=lambda kr: abs(ratios[kr] - 0.29))[:2]
    print("  nearest 29% with K=2 (FastV's own): " + ", ".join(f"R={r:.0%}: {ratios[(k, r)]:.1%}" for k, r in at_k2))
    near = sorted(ratios, key=lambda kr: (abs(ratios[kr] - 0.29), kr))[:3]
    print("  nearest 29% (K:R in steps of 5%): " + ", ".join(f"K={k} R={r:.0%}: {ratios[(k, r)]:.1%}" for k, r in near))


if __name__ == "__main__":
    main()
