"""The model card (README.md) of a ShortV checkpoint."""

from __future__ import annotations

from typing import Any

from .load import Source

PAPER = "https://arxiv.org/abs/2504.00502"


def model_card(
    source: Source,
    layers: list[int],
    flops: dict[str, float],
    command: str,
    fidelity: dict[str, Any] | None = None,
    has_plot: bool = False,
    license: str | None = None,
    repo: str = "REPO",
    verification: dict[str, Any] | None = None,
    onnx: bool = False,
) -> str:
    """A Hub model card: YAML metadata, usage (transformers, ONNX Runtime), the frozen layers, the LC plot, FLOPs,
    the verification figures and the command that made it. ``repo``: the Hub id (or folder) the usage loads."""
    base = source.repo_id or source.name
    n, total = len(layers), source.num_layers
    meta = [
        "---",
        f"base_model: {base}" if source.repo_id else None,
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"license: {license}" if license else None,
        "tags:",
        "- shortv",
        "- custom_code",
        "- llava",
        "---",
    ]
    lines = [m for m in meta if m is not None]
    lines += [
        "",
        f"# {source.name} with ShortV (N={n} of {total} layers frozen for visual tokens)",
        "",
        f"This is [{base}](https://huggingface.co/{base}) with [ShortV]({PAPER}) (Yuan et al., 2025): in {n} of "
        f"its {total} decoder layers, visual tokens are frozen during prefill: only text tokens are queries and "
        "go through the MLP, while visual tokens keep their hidden state (their keys and values are still "
        "computed). The weights are the base model's, unchanged; `modeling_shortv_llava.py` holds the small "
        "model class, and `config.json` lists the frozen layers in `shortv_layers`.",
        "",
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
        *(_onnx_usage(repo) if onnx else []),
        "## Frozen layers",
        "",
        f"`shortv_layers` = {layers} (lowest Layer Contribution first).",
        "",
        *(["![Layer Contribution per layer](lc.png)", ""] if has_plot else []),
        *(
            [
                f"On the {fidelity['samples']} calibration samples, with all {len(layers)} layers frozen together: "
                f"mean KL to the base model {fidelity['mean_kl']:.4g}, top-1 next-token agreement "
                f"{fidelity['top1_agreement']:.1%}.",
                "",
            ]
            if fidelity
            else []
        ),
        "## Prefill FLOPs (decoder layers)",
        "",
        f"For {flops['n_visual']} visual + {flops['n_text']} text tokens: {flops['vanilla_tflops']:.2f} TFLOPs "
        f"vanilla, {flops['shortv_tflops']:.2f} TFLOPs ShortV, ratio {flops['ratio']:.3f} "
        f"(ideal prefill speed-up {flops['ideal_speedup']:.2f}x).",
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


def _onnx_usage(repo: str) -> list[str]:
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
    ]


def _verification(v: dict[str, Any]) -> list[str]:
    return [
        "## Verification",
        "",
        f"Before publishing, this folder was reloaded in a fresh process with `transformers` alone "
        f"(`{v['class']}`, trust_remote_code) and run on {v['samples']} calibration prompts: its logits match the "
        f"in-process ShortV model within {v['max_abs_logits_diff_vs_in_process']:.2g} (tolerance "
        f"{v['tolerance']:.2g}), no weight is missing or unexpected, and against the base model the mean KL of "
        f"the next-token distribution is {v['mean_kl_vs_base']:.4g} with {v['top1_agreement_vs_base']:.0%} top-1 "
        f"agreement. Greedy generation for a padded batch of {v['generate_rows']} prompts ({v['generate_new_tokens']} "
        "new tokens) gives the same tokens with the KV cache as without it, and as the in-process model. "
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
