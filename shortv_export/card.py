"""The model card (README.md) of a ShortV checkpoint."""

from __future__ import annotations

from .families import FAMILIES
from .figures import Fidelity
from .load import Source

PAPER = "https://arxiv.org/abs/2504.00502"


def model_card(
    source: Source,
    result,
    *,
    repo: str = "REPO",
    has_plot: bool = False,
    license: str | None = None,
    onnx: bool = False,
    base_model: str | None = None,
) -> str:
    """A Hub model card for ``result`` (pipeline.ConvertResult: the layers, LC, FLOPs, ONNX and verification
    figures, the command that made it): YAML metadata, usage (transformers, ONNX Runtime) and those figures.
    ``repo``: the Hub id (or folder name) the usage loads; ``base_model``: the base's Hub id when the source is a
    local folder."""
    layers = result.layers
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
        *_pruning(result.prune),
        *_usage(repo, FAMILIES[source.kind]),
        *(_onnx_usage(repo, result.onnx, result.onnx_quantization) if onnx else []),
        *_frozen_layers(layers, result.lc, has_plot),
        *result.flops.card_lines(),
        *(result.verification.card_lines() if result.verification else []),
        "## Reproduce",
        "",
        "```bash",
        result.command,
        "```",
        "",
        f"Made with shortv-export. Method: Yuan et al., *ShortV: Efficient Multimodal Large Language Models by "
        f"Freezing Visual Tokens in Ineffective Layers*, ICCV 2025, {PAPER}.",
        "",
    ]
    return "\n".join(lines)


def _usage(repo: str, family) -> list[str]:
    needs = (
        [
            f"{family.display}'s processor needs torchvision in transformers "
            f"({'for its video processor' if family.video_processor else 'its module imports it'}): "
            "`pip install torchvision` before `AutoProcessor.from_pretrained`.",
            "",
        ]
        if family.torchvision
        else []
    )
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
        *needs,
    ]


def _pruning(prune: dict | None) -> list[str]:
    """The token pruning combined with ShortV (paper Table 5), if any."""
    if not prune:
        return []
    k = prune["layer"]
    if prune["method"] == "fastv":
        what = (
            f"combined with FastV (K={k}, R={prune['ratio']:.0%}): before layer {k}, each prompt's visual tokens are "
            f"ranked by the attention its last token pays them in layer {k - 1} (averaged over heads), and the "
            f"{prune['ratio']:.0%} it attends to least are removed from layers {k} and after (no queries, keys, "
            "values or MLP for them there, and none of their keys and values in those layers' cache); the kept "
            "ones keep their positions and their order, and the ShortV layers among those layers freeze them"
        )
    else:
        what = (
            f"combined with VTW (K={k}): every visual token is removed from layers {k} and after (keys and values "
            "included)"
        )
    return [
        f"ShortV is {what}. Text tokens are never removed. `config.json` holds this as `shortv_prune`; logits at "
        "removed positions are not meaningful (their state from before the first pruned layer).",
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
                Fidelity.of(fidelity).card_sentence(),
                "",
            ]
            if fidelity
            else []
        ),
        *(_text_lc(lc, has_plot) if lc is not None and lc.text is not None else []),
    ]


def _onnx_usage(repo: str, v, q) -> list[str]:
    """The ONNX Runtime usage, with the export's validation ``v`` and quantization ``q`` figures (or None)."""
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
        *(v.card_lines() if v else []),
        *(q.card_lines() if q else []),
    ]


def _text_lc(lc, has_plot: bool) -> list[str]:
    visual, text = sum(lc.visual) / len(lc.visual), sum(lc.text) / len(lc.text)
    return [
        "Text-token LC (the paper's contrast: text tokens frozen in one layer instead) is in `lc.json` (`text`)"
        f"{' and on the plot' if has_plot else ''}: a mean of {text:.4g} per layer against {visual:.4g} for "
        "visual tokens, which is why only visual tokens are frozen.",
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
