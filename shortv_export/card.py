"""The model card (README.md) of a ShortV checkpoint."""

from __future__ import annotations

from typing import Any

from .families import FAMILIES
from .flops import format_flops
from .load import Source

PAPER = "https://arxiv.org/abs/2504.00502"


def model_card(
    source: Source,
    layers: list[int],
    flops: dict[str, Any],
    command: str,
    *,
    lc: Any = None,
    has_plot: bool = False,
    license: str | None = None,
    repo: str = "REPO",
    verification: dict[str, Any] | None = None,
    onnx: bool = False,
    onnx_validation: dict[str, Any] | None = None,
    onnx_quantization: dict[str, Any] | None = None,
    base_model: str | None = None,
) -> str:
    """A Hub model card: YAML metadata, usage (transformers, ONNX Runtime), the frozen layers, the LC plot, FLOPs,
    the verification figures and the command that made it. ``repo``: the Hub id (or folder name) the usage loads;
    ``base_model``: the base's Hub id when the source is a local folder; ``lc``: the calibrate.LCResult."""
    hub_base = base_model or source.repo_id
    base = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{source.name}` (a local checkpoint)"
    n, total = len(layers), source.num_layers
    meta = [
        "---",
        f"base_model: {hub_base}" if hub_base else None,
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"license: {license}" if license else None,
        "tags:",
        "- shortv",
        "- custom_code",
        f"- {source.kind}",
        "---",
    ]
    lines = [m for m in meta if m is not None]
    lines += [
        "",
        f"# {source.name} with ShortV (N={n} of {total} layers frozen for visual tokens)",
        "",
        f"This is {base} with [ShortV]({PAPER}) (Yuan et al., 2025): in {n} of "
        f"its {total} decoder layers, visual tokens are frozen during prefill: only text tokens are queries and "
        "go through the MLP, while visual tokens keep their hidden state (their keys and values are still "
        "computed). The weights are the base model's, unchanged; `modeling_shortv.py` holds the frozen "
        f"layer, `{FAMILIES[source.kind].modeling_file}` the model class, and `config.json` lists the frozen "
        "layers in `shortv_layers`.",
        "",
        *_usage(repo),
        *(_onnx_usage(repo, onnx_validation, onnx_quantization) if onnx else []),
        *_frozen_layers(layers, lc, has_plot),
        "## Prefill FLOPs (decoder layers)",
        "",
        f"For {flops['n_visual']} visual + {flops['n_text']} text tokens ({_tokens_from(flops)}): "
        f"{format_flops(flops['vanilla_tflops'])} vanilla, {format_flops(flops['shortv_tflops'])} ShortV, ratio "
        f"{flops['ratio']:.3f} (ideal prefill speed-up {flops['ideal_speedup']:.2f}x).",
        "",
        *(_verification(verification) if verification else []),
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Made with shortv-export. Method: Yuan et al., *ShortV: Efficient Multimodal Large Language Models by "
        f"Freezing Visual Tokens in Ineffective Layers*, ICCV 2025, {PAPER}.",
        "",
    ]
    return "\n".join(lines)


def _usage(repo: str) -> list[str]:
    return [
        "## Usage",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f"repo = {repo!r}",
        "model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)",
        "processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)",
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        'image = Image.open("photo.jpg")  # any image',
        'inputs = processor(images=image, text=prompt, return_tensors="pt")',
        "print(processor.decode(model.generate(**inputs, max_new_tokens=30)[0], skip_special_tokens=True))",
        "```",
        "",
        '`AutoModel`, `pipeline("image-text-to-text")`, batches with padding, bf16/fp16, eager and SDPA '
        'attention and `device_map="auto"` work as with the base model. `trust_remote_code=True` is required.',
        "",
    ]


def _frozen_layers(layers: list[int], lc, has_plot: bool) -> list[str]:
    fidelity = lc.fidelity if lc is not None else None
    return [
        "## Frozen layers",
        "",
        f"`shortv_layers` = {layers} (lowest Layer Contribution first).",
        "",
        *(["![Layer Contribution per layer](lc.png)", ""] if has_plot else []),
        *(
            [
                f"On the {fidelity['samples']} calibration samples, with all {len(layers)} layers frozen together: "
                f"mean KL to the base model {fidelity['mean_kl']:.4g}, top-1 next-token agreement "
                f"{fidelity['top1_agreement']:.1%}.{_below_floor(fidelity)}",
                "",
            ]
            if fidelity
            else []
        ),
        *(_text_lc(lc, has_plot) if lc is not None and lc.text is not None else []),
    ]


def _onnx_usage(repo: str, v: dict[str, Any] | None, q: dict[str, Any] | None) -> list[str]:
    checked = (
        [
            f"Checked at export against PyTorch on {v['samples']} padded sample prompts, prefill and "
            f"{v['decode_steps']} decode steps: max |logits diff| "
            f"{max(v['max_abs_logits_diff'], v['max_abs_decode_logits_diff']):.2g} (tolerance {v['tolerance']:.2g}), "
            f"max |KV cache diff| {v['max_abs_present_diff']:.2g}, greedy tokens "
            f"{'the same' if v['greedy_tokens_agree'] else 'not all the same'}.",
            "",
        ]
        if v
        else []
    )
    return [
        "### ONNX Runtime",
        "",
        "`onnx/` holds the vision encoder, the token embedding and the decoder with the frozen layers' text-only "
        "branch in the graph; `onnx/shortv_onnx.json` documents every input and output. With "
        "`pip install shortv-export[onnx]` (or `[gpu]` for onnxruntime-gpu):",
        "",
        "```python",
        "from shortv_export.onnx_runtime import ShortVOnnxModel  # numpy + onnxruntime only",
        "",
        f'model = ShortVOnnxModel.from_pretrained({repo!r}, provider="cpu")  # a local copy of this repo',
        'inputs = processor(images=image, text=prompt, return_tensors="np")',
        "print(processor.decode(model.generate(**inputs, max_new_tokens=30)[0], skip_special_tokens=True))",
        "```",
        "",
        *checked,
        *(
            [
                f"The decoder's weights are quantized to {q['scheme']} ({q['method']}, blocks of {q['block_size']}; "
                f"{q['decoder_bytes_before'] / 2**20:.1f} -> {q['decoder_bytes_after'] / 2**20:.1f} MiB). Against the "
                f"unquantized graph on {q['samples']} calibration prompts: top-1 next-token agreement "
                f"{q['top1_agreement_vs_unquantized']:.1%}, mean KL {q['mean_kl']:.3g}.",
                "",
            ]
            if q
            else []
        ),
    ]


def _below_floor(f: dict[str, Any]) -> str:
    floor = f.get("min_agreement")
    if floor is None or f["top1_agreement"] >= floor:
        return ""
    good = f.get("largest_n_above_min_agreement", 0)
    keeps = f"; freezing the {good} lowest-LC layers keeps {f['largest_n_top1_agreement']:.1%}" if good else ""
    return f" That is below the {floor:.0%} this conversion was asked to keep{keeps}."


def _tokens_from(flops: dict[str, Any]) -> str:
    return {
        "calibration set mean": "the calibration set's mean per prompt",
        "typical prompt": "one typical image and a 64-token prompt",
    }.get(flops.get("tokens_from"), "per prompt")


def _text_lc(lc, has_plot: bool) -> list[str]:
    visual, text = sum(lc.visual) / len(lc.visual), sum(lc.text) / len(lc.text)
    return [
        "Text-token LC (the paper's contrast: text tokens frozen in one layer instead) is in `lc.json` (`text`)"
        f"{' and on the plot' if has_plot else ''}: a mean of {text:.4g} per layer against {visual:.4g} for "
        "visual tokens, which is why only visual tokens are frozen.",
        "",
    ]


def _verification(v: dict[str, Any]) -> list[str]:
    diff = v["max_abs_logits_diff_vs_in_process"]
    match = "exactly" if diff == 0 else f"within {diff:.2g} (tolerance {v['tolerance']:.2g})"
    return [
        "## Verification",
        "",
        f"After it was written, this folder was reloaded in a fresh process with `transformers` alone "
        f"(`{v['class']}`, trust_remote_code) and run on {v['samples']} calibration prompts: its logits match the "
        f"in-process ShortV model {match}, no weight is missing or unexpected, and against the base model the "
        f"mean KL of the next-token distribution is {v['mean_kl_vs_base']:.4g} with "
        f"{v['top1_agreement_vs_base']:.0%} top-1 agreement. Greedy generation for a padded batch of "
        f"{v['generate_rows']} prompts ({v['generate_new_tokens']} new tokens) with the KV cache gives the logits "
        "that one forward over the same tokens without the cache gives (max difference "
        f"{v['generate_max_abs_logits_diff_cached_vs_uncached']:.2g}), and the in-process model's tokens. "
        f"Run in {v.get('dtype', 'float32')} on {v.get('device', 'cpu')}. "
        f"Checked with transformers {v['transformers']}.",
        "",
    ]


def base_license(source: Source) -> str | None:
    """The base model card's ``license`` (YAML metadata), if its README.md is there."""
    card = source.path / "README.md"
    if not card.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.license
    except Exception:  # a malformed base card must not stop the conversion
        return None
