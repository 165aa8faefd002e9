"""easy-VQA test accuracy of the trained tiny LLaVA, vanilla vs ShortV, and the paper's ablations in miniature.

    pip install easy-vqa
    python scripts/eval_easyvqa.py examples/tiny-llava-easyvqa [--limit 2000] [--plot docs/easyvqa_accuracy.png]

Prints markdown tables:
1. accuracy vs N (N = 0..L frozen layers, chosen by LC calibrated on 40 easy-VQA train samples);
2. at N = round(0.6 L): LC-chosen (easy-VQA calibration, and the default embedded calibration set) vs random
   layers (mean and sd over 5 seeds) vs the layers where visual tokens change least (cosine similarity of each
   layer's input and output at visual positions, on the same 40 samples);
3. in the same LC-chosen layers: freezing visual tokens (ShortV) vs text tokens vs all tokens (prefill).
Greedy exact match, as in scripts/train_tiny_llava.py. Visual freezing runs the ShortV model class itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from shortv_export.modeling.modeling_shortv import FROZEN_LAYERS  # noqa: E402
from train_tiny_llava import Encoded, accuracy, easy_vqa_split  # noqa: E402

from shortv_export.calibrate import calibrate  # noqa: E402
from shortv_export.data import load_calibration  # noqa: E402
from shortv_export.models import load_shortv  # noqa: E402


def switchable(model) -> None:
    """Make every decoder layer a ShortV layer with the same weights: which of them freeze is then just
    ``model.model.shortv_layers`` (a ShortV layer not listed there runs the stock code)."""
    lm = model.model.language_model
    layer_class = FROZEN_LAYERS[lm.config.model_type]
    for i, layer in enumerate(lm.layers):
        if not isinstance(layer, layer_class):
            new = layer_class(lm.config, i).to(next(layer.parameters()).dtype)
            new.load_state_dict(layer.state_dict())
            lm.layers[i] = new.eval()


def set_frozen(model, layers) -> None:
    """Freeze visual tokens in ``layers`` of a model made ``switchable``."""
    model.model.shortv_layers = list(layers)


@contextlib.contextmanager
def freeze_rows(model, layers, which: str, image_token_id: int):
    """Prefill-only freezing of text or all tokens in ``layers`` (hooks resetting rows to the layer input)."""
    state = {}

    def capture(_m, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            text = (ids != image_token_id) & (kwargs["attention_mask"] == 1)
            state["rows"] = text if which == "text" else torch.ones_like(text)
        else:
            state["rows"] = None

    def reset(_m, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        rows = state.get("rows")
        if rows is None or rows.shape != hidden_in.shape[:2]:
            return output
        return torch.where(rows.unsqueeze(-1), hidden_in, output)

    handles = [model.model.register_forward_pre_hook(capture, with_kwargs=True)]
    layer_list = model.model.language_model.layers
    handles += [layer_list[i].register_forward_hook(reset, with_kwargs=True, prepend=True) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def easyvqa_calibration(samples: int, folder: Path):
    """``samples`` train questions (seeded choice) as a calibration set file."""
    questions, _, paths = easy_vqa_split("train")
    lines = [json.dumps({"image": p, "prompt": q}) for q, p in zip(questions, paths, strict=True)]
    path = folder / "easyvqa_train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return load_calibration(str(path), samples=samples, seed=0)


@torch.no_grad()
def cosine_order(model, processor, calib) -> list[int]:
    """Layers by decreasing mean cosine similarity of input and output hidden states at visual positions."""
    from shortv_export.data import format_prompt

    sims = None
    tok = processor.tokenizer
    tok.padding_side = "left"
    for s in calib.samples:
        inputs = processor(images=[s.load_image()], text=[format_prompt(processor, s.prompt)], return_tensors="pt")
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        visual = inputs["input_ids"][0] == model.config.image_token_id
        layer_sims = torch.stack(
            [
                torch.nn.functional.cosine_similarity(hidden[i][0, visual], hidden[i + 1][0, visual], dim=-1).mean()
                for i in range(len(hidden) - 1)
            ]
        )
        sims = layer_sims if sims is None else sims + layer_sims
    return sorted(range(len(sims)), key=lambda i: -float(sims[i]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--limit", type=int, help="first K test questions only (seeded shuffle)")
    parser.add_argument("--calib-samples", type=int, default=40)
    parser.add_argument("--curve", help="comma list of N for the accuracy-vs-N table (default: every N); 0 is added")
    parser.add_argument("--plot", type=Path, help="write the accuracy-vs-N curve here (needs matplotlib)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    from transformers import AutoProcessor

    start = time.time()
    processor = AutoProcessor.from_pretrained(args.model)
    test = Encoded(processor, *easy_vqa_split("test"))
    rows = list(range(len(test)))
    if args.limit:
        random.Random(0).shuffle(rows)
        rows = sorted(rows[: args.limit])
    model = load_shortv(args.model, [], attn_implementation="sdpa").eval()
    switchable(model)
    layers = len(model.model.language_model.layers)
    n60 = round(0.6 * layers)
    with tempfile.TemporaryDirectory() as tmp:
        calib = easyvqa_calibration(args.calib_samples, Path(tmp))
        for s in calib.samples:
            s.load_image()
        set_frozen(model, [])
        lc_vqa = calibrate(model, processor, calib, modality="both", batch_size=8, progress=False)
        lc_default = calibrate(model, processor, load_calibration(None), batch_size=8, progress=False)
        cosine = cosine_order(model, processor, calib)

    def acc(frozen) -> float:
        set_frozen(model, frozen)
        return accuracy(model, test, rows, processor)

    results = {"test_questions": len(rows), "layers": layers, "n60": n60}
    results["lc_easyvqa"] = {"visual": lc_vqa.visual, "text": lc_vqa.text, "order": lc_vqa.order}
    results["lc_default"] = {"visual": lc_default.visual, "order": lc_default.order}
    results["cosine_order"] = cosine

    ns = sorted({0, *map(int, args.curve.split(","))}) if args.curve else range(layers + 1)
    curve = [(n, lc_vqa.order[:n], acc(lc_vqa.order[:n])) for n in ns]
    results["curve"] = [{"n": n, "layers": f, "accuracy": a} for n, f, a in curve]
    print(f"# {args.model}: {layers} layers; {len(rows)} easy-VQA test questions; greedy exact match\n")
    print("LC (visual, easy-VQA calibration):", [round(v, 4) for v in lc_vqa.visual])
    print("LC (text, easy-VQA calibration):  ", [round(v, 4) for v in lc_vqa.text])
    print("LC (visual, default set):         ", [round(v, 4) for v in lc_default.visual])
    print()
    print("| N frozen | layers (lowest LC first) | accuracy |")
    print("|---|---|---|")
    for n, f, a in curve:
        print(f"| {n} | {f} | {a:.2%} |")

    random_accs = []
    for seed in range(5):
        chosen = sorted(random.Random(seed).sample(range(layers), n60))
        random_accs.append(acc(chosen))
    choices = {
        "LC, easy-VQA calibration (40 train samples)": lc_vqa.order[:n60],
        "LC, default embedded calibration set": lc_default.order[:n60],
        "cosine similarity (visual tokens change least)": cosine[:n60],
    }
    table = {name: (layers_, acc(layers_)) for name, layers_ in choices.items()}
    results["selection"] = {name: {"layers": f, "accuracy": a} for name, (f, a) in table.items()}
    results["random"] = {"accuracies": random_accs}
    print(f"\nAt N = {n60} of {layers} (vanilla {curve[0][2]:.2%}):\n")
    print("| layer choice | layers | accuracy |")
    print("|---|---|---|")
    for name, (f, a) in table.items():
        print(f"| {name} | {sorted(f)} | {a:.2%} |")
    mean, sd = statistics.mean(random_accs), statistics.stdev(random_accs)
    print(f"| random (5 seeds) | - | {mean:.2%} ± {sd:.2%} |")

    frozen = lc_vqa.order[:n60]
    set_frozen(model, [])
    modality = {"visual tokens (ShortV)": acc(frozen)}
    set_frozen(model, [])
    for which in ("text", "all"):
        with freeze_rows(model, frozen, which, model.config.image_token_id):
            modality[f"{which} tokens"] = accuracy(model, test, rows, processor)
    results["modality"] = modality
    print(f"\nFreezing in the same {n60} LC-chosen layers {sorted(frozen)} (prefill):\n")
    print("| frozen tokens | accuracy |")
    print("|---|---|")
    for name, a in modality.items():
        print(f"| {name} | {a:.2%} |")
    print(f"\n({(time.time() - start) / 60:.1f} minutes)")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([n for n, _, _ in curve], [a * 100 for _, _, a in curve], marker="o", label="ShortV (LC order)")
        ax.axhline(mean * 100, color="gray", ls="--", label=f"random {n60} layers (mean)")
        ax.set_xlabel("frozen layers N")
        ax.set_ylabel("easy-VQA test accuracy (%)")
        ax.set_title(f"{args.model.name}: accuracy vs N")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
