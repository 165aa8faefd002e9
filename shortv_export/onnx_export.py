"""Stage 5, export: ONNX graphs of a ShortV checkpoint, with the frozen layers' text-only branch baked in.

Three graphs, with optimum's input and output names (``past_key_values.{i}.key|value`` in,
``present.{i}.key|value`` out), run by `shortv_export.onnx_runtime`:

- ``vision_encoder.onnx``: ``pixel_values`` [images, 3, H, W] -> ``image_features`` [images, tokens, hidden]
  (vision tower, feature layer and strategy, projector). LLaVA-NeXT also returns ``image_newline`` [hidden]:
  the runner does the anyres unpadding and packing, which depend on each image's size. Idefics3 / SmolVLM take
  tiles and ``pixel_attention_mask`` [tiles, H, W] (the processor's split, padding tiles dropped by the runner).
  Qwen2.5-VL takes patches plus the row/column, window order and window/frame masks the runner computes from
  ``image_grid_thw`` (``onnx_runtime.qwen_vision_inputs``), and its decoder 3-D ``position_ids`` [3, batch, seq].
- ``embed_tokens.onnx``: ``input_ids`` -> ``inputs_embeds``.
- ``decoder_model_merged.onnx``: ``inputs_embeds``, ``attention_mask`` [batch, past + seq], ``position_ids``,
  ``text_index`` [batch, text] (each row's non-image positions; rows with fewer repeat their last one) and
  ``past_key_values.{i}.key|value`` -> ``logits`` (last position), ``last_hidden_state`` and
  ``present.{i}.key|value``. Frozen layers gather the ``text_index`` rows before Q, O and the MLP, so prefill
  and decode share one graph (in decode every new token is text).

``onnx/shortv_onnx.json`` documents every input and output and holds what the runner needs from the config, the
validation figures and, with ``--onnx-quantize``, what was quantized.

Compatibility: any ONNX Runtime (CPU, CUDA, TensorRT providers) through our runner, or your own loop fed as the
json describes. Not drop-in for optimum's ``ORTModelForCausalLM`` or transformers.js: the decoder has no
``use_cache_branch`` input, takes ``text_index``, and returns the last position's logits only; nor for
onnxruntime-genai, which would need its ``genai_config.json`` and a pipeline for the vision and embedding graphs
(LLaVA is not one of its model types). Weights from 64 MiB on are external data (``*.onnx.data``).
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import logging
import re
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .errors import ShortVError
from .families import FAMILIES
from .onnx_runtime import SPEC_FILE, kept_slots, qwen_vision_inputs
from .util import first_line, progress_bar

GRAPHS = ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx")
ONNX_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXTERNAL_DATA_BYTES = 1 << 26  # weights from 64 MiB on go to a .data file: streamed out, never copied in a protobuf
OPSET = 18


@dataclass(frozen=True)
class GraphIO:
    """One input or output of a graph, declared once: the export's names and dynamic axes, the graph's axis names
    and its entry in shortv_onnx.json all come from it."""

    name: str
    shape: tuple[int | str, ...]  # int: a fixed size; str: a named one (an input's: dynamic), in graph and json
    dtype: str  # "float32", "float16", "int64", "bool"
    doc: str = ""
    # axes the graph names otherwise than the json (an input axis the json writes as an expression, "past + seq")
    graph_names: dict[int, str] = field(default_factory=dict)

    def axes(self) -> dict[int, str]:
        """Axis -> name in the graph: the named axes (an expression, such as an output's "past + seq", is left as
        the exporter derives it) and ``graph_names``."""
        named = {i: a for i, a in enumerate(self.shape) if isinstance(a, str) and a.isidentifier()}
        return named | self.graph_names

    def spec(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, **({"doc": self.doc} if self.doc else {})}


def per_layer(template: GraphIO, num_layers: int) -> list[GraphIO]:
    """``template`` (its name with ``{i}`` and ``{kv}``) for the key and the value of every layer, in layer order."""
    return [
        replace(template, name=template.name.format(i=i, kv=kv)) for i in range(num_layers) for kv in ("key", "value")
    ]


@dataclass(frozen=True)
class Graph:
    """One ONNX graph: its key in shortv_onnx.json, its file, and its inputs and outputs in order."""

    key: str
    file: str
    inputs: tuple[GraphIO, ...]
    outputs: tuple[GraphIO, ...]
    doc: str = ""

    def dynamic_shapes(self, dims: dict) -> list[dict]:
        """torch.export's dynamic shapes, one dict per input: every named axis, as ``dims`` has it, else free."""
        free = torch.export.Dim.DYNAMIC
        return [{i: dims.get(a, free) for i, a in enumerate(io.shape) if isinstance(a, str)} for io in self.inputs]

    def axes(self) -> dict[str, dict[int, str]]:
        """Input or output -> its axes' names in the graph (see `GraphIO.axes`)."""
        return {io.name: io.axes() for io in (*self.inputs, *self.outputs) if io.axes()}

    def spec(self) -> dict:
        """Its entry in shortv_onnx.json."""
        entry = {
            "file": self.file,
            "inputs": {io.name: io.spec() for io in self.inputs},
            "outputs": {io.name: io.spec() for io in self.outputs},
        }
        return {self.key: entry | ({"doc": self.doc} if self.doc else {})}


class _VisionEncoder(nn.Module):
    """Pixels to projected features, the way LlavaModel.get_image_features computes them, without the list."""

    def __init__(self, model):
        super().__init__()
        inner = model.model
        self.vision_tower = inner.vision_tower
        self.projector = inner.multi_modal_projector
        self.image_newline = getattr(inner, "image_newline", None)
        self.layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy

    def forward(self, pixel_values):
        hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        layers = [self.layer] if isinstance(self.layer, int) else self.layer
        selected = [hidden[i][:, 1:] if self.strategy == "default" else hidden[i] for i in layers]
        features = self.projector(selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1))
        if self.image_newline is None:
            return features
        return features, self.image_newline * 1  # an output of its own (a node, not a bare initializer)


class _TileEncoder(nn.Module):
    """Idefics3 / SmolVLM: image tiles to projected features, as Idefics3Model.get_image_features computes them
    for the real (non-padding) tiles: ``pixel_values`` [tiles, 3, H, W] and ``pixel_attention_mask`` [tiles, H, W]
    -> ``image_features`` [tiles, tokens, hidden] (the runner drops padding tiles first)."""

    def __init__(self, model):
        super().__init__()
        inner = model.model
        self.vision_model = inner.vision_model
        self.connector = inner.connector
        self.patch = model.config.vision_config.patch_size

    def forward(self, pixel_values, pixel_attention_mask):
        p = self.patch
        patches = pixel_attention_mask.unfold(1, p, p).unfold(2, p, p)
        patch_mask = patches.sum(dim=(-1, -2)) > 0
        hidden = self.vision_model(pixel_values=pixel_values, patch_attention_mask=patch_mask).last_hidden_state
        return self.connector(hidden)


def _graph_kind(model) -> str | None:
    """The graph kind of a ShortV model's family (``families.Family.onnx``: "llava", "tiled" or "mrope")."""
    return FAMILIES[model.config.model_type.removeprefix("shortv_")].onnx


class _WindowedVisionEncoder(nn.Module):
    """Qwen2-VL / Qwen2.5-VL: patches to merged features, as the vision tower computes them, with what its forward
    derives from ``grid_thw`` in Python loops (which torch.export cannot trace for any grid) given as inputs,
    computed by the runner: ``pixel_values`` [P, C*T*p*p], ``position_ids`` [P, 2] (each patch's row and column),
    ``window_index`` [P / m^2] (merge units in window order), ``window_mask`` and ``full_mask`` [P, P] (True:
    attend; within a window / a frame, in window order) -> ``image_features`` [P / m^2, hidden], processor order.
    The blocks attend with those masks instead of splitting the sequence per window (the same softmax). Qwen2-VL
    has no windows: every block attends within frames (its runner inputs: identity order, window = frame)."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.visual
        self.unit = model.config.vision_config.spatial_merge_size**2
        self.full_blocks = set(getattr(self.tower, "fullatt_block_indexes", range(len(self.tower.blocks))))

    def forward(self, pixel_values, position_ids, window_index, window_mask, full_mask):
        apply_rotary_pos_emb_vision = sys.modules[type(self.tower).__module__].apply_rotary_pos_emb_vision
        tower, n = self.tower, pixel_values.shape[0]

        def in_window_order(t):  # merge units reordered, as permute_input_for_window_attn does
            return t.reshape(n // self.unit, self.unit, -1)[window_index].reshape(n, -1)

        hidden = in_window_order(tower.patch_embed(pixel_values))
        cos, sin = (in_window_order(t) for t in tower.rotary_pos_emb(hidden, position_ids))
        for i, block in enumerate(tower.blocks):
            attn = block.attn
            qkv = attn.qkv(block.norm1(hidden)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            query, key = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
            query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, qkv[2]))
            mask = full_mask if i in self.full_blocks else window_mask
            out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling)
            hidden = hidden + attn.proj(out.squeeze(0).transpose(0, 1).reshape(n, -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
        return tower.merger(hidden)[torch.argsort(window_index)]


class _Embed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class _Decoder(nn.Module):
    """The language model with a flat KV cache, explicit masks and the ShortV text-row index as inputs."""

    def __init__(self, model):
        super().__init__()
        from .compat import cache_kwarg
        from .modeling.modeling_shortv import attention_types

        self.lm = model.model.shortv_text_model()
        self.lm_head = model.lm_head
        self.num_layers = len(self.lm.layers)
        self.frozen = list(model.model.shortv_layers)
        self.cache_kwarg = cache_kwarg()
        window = getattr(self.lm.config, "sliding_window", None)
        # attention type -> sliding window (None: full causal), for the types the layers use
        self.windows = {
            kind: window if kind == "sliding_attention" else None for kind in attention_types(self.lm.config)
        }

    def forward(self, inputs_embeds, attention_mask, position_ids, text_index, *past):
        return self.run(inputs_embeds, attention_mask, position_ids, text_index, past)

    def run(self, inputs_embeds, attention_mask, position_ids, text_index, past, **layer_kwargs):
        """(logits, hidden, *presents); ``layer_kwargs`` go to every decoder layer (the token pruning)."""
        from transformers import DynamicCache

        from .compat import output_cache
        from .modeling.modeling_shortv import text_rows_inputs

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        seq = inputs_embeds.shape[1]
        total = attention_mask.shape[1]
        dtype = inputs_embeds.dtype
        keys = torch.arange(total, device=inputs_embeds.device)
        keep = attention_mask.bool()[:, None, None, :]
        blocked = torch.finfo(dtype).min

        def mask(queries, window):  # queries: absolute indices [..., Q] -> float mask [B, 1, Q, K]
            allowed = keys <= queries[..., None]
            if window is not None:
                allowed = allowed & (keys > queries[..., None] - window)
            allowed = allowed.view(-1, 1, *allowed.shape[-2:]) & keep
            return torch.where(allowed, 0.0, blocked).to(dtype)

        queries = torch.arange(seq, device=keys.device) + (total - seq)  # absolute index of each new position
        masks = {kind: mask(queries, window) for kind, window in self.windows.items()}
        kwargs = dict(layer_kwargs)
        if self.frozen:  # the rows of those masks for the text queries, built directly (no [S, K] gather)
            text_masks = {kind: mask(text_index + (total - seq), window) for kind, window in self.windows.items()}
            # short rows repeat a text position: the same value is scattered twice, no validity flags needed
            kwargs["shortv"] = text_rows_inputs(self.lm, self.frozen, text_index, None, text_masks, position_ids)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=masks if len(masks) > 1 else next(iter(masks.values())),
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: cache},
            **kwargs,
        )
        hidden = out.last_hidden_state
        logits = self.lm_head(hidden[:, -1:])
        presents = [t for layer in output_cache(out).layers for t in (layer.keys, layer.values)]
        return (logits, hidden, *presents)


class _PrunedDecoder(_Decoder):
    """The decoder with FastV or VTW (``config.shortv_prune``) from layer K: ``visual_mask`` [batch, seq] marks the
    new rows' visual tokens, ``kept_valid`` [batch, kept] the slots of each row's kept rows (`onnx_pruning`),
    ``pruned_past_mask`` [batch, pruned_past] which keys the layers from K on hold from earlier calls may be
    attended to; the graph returns that mask for the next call (``pruned_mask``) after the logits and hidden
    states. The presents of layers from K on hold the kept rows only."""

    def __init__(self, model):
        super().__init__(model)
        self.prune = dict(model.config.shortv_prune)

    def forward(
        self, inputs_embeds, attention_mask, position_ids, text_index, visual_mask, kept_valid, pruned_past_mask, *past
    ):
        from .modeling.modeling_shortv import last_positions
        from .onnx_pruning import GraphPruning

        layer = self.prune["layer"]
        padding = attention_mask[:, -inputs_embeds.shape[1] :].bool()
        pruning = GraphPruning(
            layer=layer,
            ratio=self.prune.get("ratio"),
            visual=visual_mask,
            padding=padding,
            query=last_positions(visual_mask, padding),
            n_visual=None,
            frozen_layers=frozenset(i for i in self.frozen if i >= layer),
            language_model=self.lm,
            kept_valid=kept_valid,
            past_ok=pruned_past_mask.bool(),
            positions=position_ids,
            text=text_index,
        )
        logits, hidden, *presents = self.run(
            inputs_embeds, attention_mask, position_ids, text_index, past, shortv_pruning=pruning
        )
        return (logits, hidden, torch.cat([pruned_past_mask, pruning.ok.long()], dim=1), *presents)


@dataclass
class ExportReport:
    folder: Path
    files: dict[str, int]  # name -> bytes
    validation: dict | None = None
    quantization: dict | None = None


def export_onnx(
    checkpoint: str | Path,
    *,
    dtype: str = "fp32",
    out: str | Path | None = None,
    validate: bool = True,
    progress: bool = True,
    quantize: str | None = None,
    device: str | None = None,
) -> ExportReport:
    """Export the ShortV checkpoint folder ``checkpoint`` to ``out`` (default ``checkpoint/onnx``), check it
    against PyTorch (``validate``), then quantize the decoder's weights (``quantize``: "int4" or "int8"; see
    `shortv_export.onnx_quantize`), checked against the unquantized graph. ``device``: where the model is traced
    and the PyTorch reference runs ("cuda" traces on the GPU and validates with ONNX Runtime's CUDA provider);
    default the CPU."""
    from .models import SUPPORTED

    for module in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(module) is None:
            raise ShortVError(f"--onnx needs {module}: pip install 'shortv-export[onnx]' (or [gpu] for CUDA)")
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint / "onnx"
    if dtype not in ONNX_DTYPES:
        raise ShortVError(f"--onnx-dtype {dtype}: choose one of {', '.join(ONNX_DTYPES)}")
    config_dict = json.loads((checkpoint / "config.json").read_text())
    kind = {v.model_type: k for k, v in SUPPORTED.items()}.get(config_dict.get("model_type"))
    if kind is None:
        raise ShortVError(f"{checkpoint} is not a ShortV checkpoint (model_type {config_dict.get('model_type')!r})")
    config_cls, model_cls = SUPPORTED[kind].config_cls, SUPPORTED[kind].model_cls
    config = config_cls.from_dict({k: v for k, v in config_dict.items() if k != "auto_map"})
    # Weights read tensor by tensor and converted to the ONNX dtype: one copy in memory, never the memory-mapped
    # checkpoint beside it (from_pretrained's mmap keeps every page it reads resident until it is done).
    weights = read_safetensors(checkpoint, ONNX_DTYPES[dtype])
    model, info = model_cls.from_pretrained(
        None, config=config, state_dict=weights, dtype=ONNX_DTYPES[dtype], output_loading_info=True
    )
    del weights
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ShortVError(
            f"the weights of {checkpoint} do not fit the model: missing {sorted(info['missing_keys'])[:3]}, "
            f"unexpected {sorted(info['unexpected_keys'])[:3]}"
        )
    model.to(device or "cpu").eval()
    out.mkdir(parents=True, exist_ok=True)
    steps = [("vision_encoder", _export_vision), ("embed_tokens", _export_embed), ("decoder", _export_decoder)]
    bar = progress_bar(len(steps), desc="exporting ONNX", enabled=progress, unit="graph")
    spec = {"format": 1, "dtype": _name(ONNX_DTYPES[dtype]), "opset": OPSET, **_runner_config(model, kind)}
    for name, step in steps:
        bar.set_description(f"exporting {name}")
        spec.update(step(model, out))
        bar.update()
    bar.close()
    report = ExportReport(out, {})
    if validate:  # PyTorch's side first, so that the model is gone before ONNX Runtime loads the graphs
        from .load import load_processor
        from .onnx_validate import sample_inputs, torch_reference, validate_export

        inputs = sample_inputs(load_processor(checkpoint))
        reference = torch_reference(model, inputs)
        del model
        gc.collect()
        (out / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        provider = "cuda" if str(device or "cpu").startswith("cuda") else "cpu"
        report.validation = validate_export(reference, inputs, out, provider=provider)
        spec["validation"] = report.validation
    if quantize:
        from .onnx_quantize import quantize_decoder

        external = (out / "decoder_model_merged.onnx.data").exists()
        report.quantization = spec["quantization"] = quantize_decoder(out, quantize, checkpoint, external)
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    report.files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    return report


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder``'s safetensors weights (the shards its index names, else every file), floating
    ones converted to ``dtype``, read with plain file reads one tensor at a time (no memory map), so that at most
    one tensor of the checkpoint's own dtype is held beside the converted ones."""
    import struct
    import sys

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if sys.byteorder != "little":
        raise ShortVError("reading safetensors weights needs a little-endian machine")
    tensors = {}
    for path in files:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ShortVError(f"{path.name}: tensor {name} has dtype {info['dtype']}, which --onnx cannot read")
                start, end = info["data_offsets"]
                f.seek(8 + size + start)
                raw = torch.empty(end - start, dtype=torch.uint8)
                if f.readinto(memoryview(raw.numpy())) != end - start:
                    raise ShortVError(f"{path} is truncated (tensor {name})")
                tensor = raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
                tensors[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return tensors


def _runner_config(model, kind) -> dict:
    config = model.config
    text = config.text_config
    runner = {
        "model_type": kind,
        "image_token_id": config.image_token_id,
        "shortv_layers": list(model.model.shortv_layers),
        "num_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "head_dim": _head_dim(text),
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
        "shortv_prune": getattr(config, "shortv_prune", None),
    }
    if FAMILIES[kind].onnx == "mrope":
        vision = config.vision_config
        window = getattr(vision, "window_size", None)  # Qwen2-VL: none
        runner.update(spatial_merge_size=vision.spatial_merge_size, window_size=window, patch_size=vision.patch_size)
    if kind == "llava_next":
        runner["image_grid_pinpoints"] = config.image_grid_pinpoints
        runner["vision_image_size"] = config.vision_config.image_size
        runner["vision_patch_size"] = config.vision_config.patch_size
    return runner


def _save(program, path: Path, n_bytes: int, axes: dict[str, dict[int, str]]) -> None:
    """Save, then give the symbolic axes readable names and drop the exporter's source paths."""
    import onnx

    external = n_bytes >= EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=external)
    graph_model = onnx.load(str(path), load_external_data=False)
    graph = graph_model.graph
    rename = {}
    for value in [*graph.input, *graph.output]:
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param and " " not in dim.dim_param:
                rename[dim.dim_param] = name
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, rename)) + r")\b") if rename else None
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if pattern and dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: rename[m.group(1)], dim.dim_param)
    for node in graph.node:
        kept = [p for p in node.metadata_props if p.key not in _DROPPED_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(graph_model, str(path))


_DROPPED_METADATA = {"pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node"}  # local paths, bulk


def _release_rewriter_state() -> None:
    """onnxscript's module-level rewrite rules keep the last node they matched, and with it the exported graph and
    every weight it references, alive after the export (onnxscript 0.7): drop those references so the model's
    memory is freed before ONNX Runtime loads the graphs."""
    from onnxscript.rewriter import RewriteRule, RewriteRuleSet

    for name, module in list(sys.modules.items()):
        if not name.startswith("onnxscript.rewriter") or module is None:
            continue
        for value in list(vars(module).values()):
            rules = (
                value.rules if isinstance(value, RewriteRuleSet) else [value] if isinstance(value, RewriteRule) else []
            )
            for rule in rules:
                matcher = getattr(rule, "_matcher", None)
                for state in list(vars(matcher)) if matcher is not None else []:
                    if state != "pattern":  # the rest is what the last match left behind
                        setattr(matcher, state, None)


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _export(module, args, out: Path, graph: Graph, dims: dict | None = None) -> None:
    """Export ``module`` called on ``args`` to ``out / graph.file``, its inputs and outputs as ``graph`` declares
    them (``dims``: the torch.export Dims of named axes; every other named input axis is free)."""
    path = out / graph.file
    device = next(module.parameters()).device
    args = tuple(arg.to(device) for arg in args)
    quiet = logging.getLogger("torch.onnx")
    level, quiet.level = quiet.level, logging.ERROR  # "torchvision is not installed" notices
    dedup = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    dedup.addFilter(_not_a_dedup_notice)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module.eval(),
                args,
                input_names=[io.name for io in graph.inputs],
                output_names=[io.name for io in graph.outputs],
                dynamic_shapes=_per_parameter(module, graph.dynamic_shapes(dims or {})),
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
        except Exception as err:  # torch.export raises many types with pages of detail; one clear line for the user
            raise ShortVError(f"ONNX export of {path.name} failed: {first_line(err, limit=300)}") from err
        finally:
            quiet.setLevel(level)
            dedup.removeFilter(_not_a_dedup_notice)
    _save(program, path, _param_bytes(module), graph.axes())
    del program
    _release_rewriter_state()


def _not_a_dedup_notice(record: logging.LogRecord) -> bool:
    """False for onnx_ir's notice that an initializer which is also a graph output is not deduplicated (LLaVA-NeXT's
    image_newline, folded to a constant by the exporter's optimizer): nothing for the user to act on."""
    message = str(record.msg)
    return not (message.startswith("Skipped deduplication of initializer") and "graph input or output" in message)


def _per_parameter(module, shapes: list[dict]) -> tuple:
    """Dynamic shapes laid out as ``module.forward``'s parameters: a ``*past`` parameter takes the rest as one tuple."""
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        return (*shapes[: len(params) - 1], tuple(shapes[len(params) - 1 :]))
    return tuple(shapes)


# -- the graphs: each one's inputs and outputs in one table, and the example inputs it is traced with ----------


def _image_graph(config, dtype: str, newline: bool) -> Graph:
    """LLaVA, LLaVA-NeXT (whose tiles come as images, and which returns its row-end embedding too)."""
    size, hidden = config.vision_config.image_size, config.text_config.hidden_size
    return Graph(
        "vision_encoder",
        GRAPHS[0],
        inputs=(GraphIO("pixel_values", ("images", 3, size, size), dtype),),
        outputs=(
            GraphIO("image_features", ("images", "image_tokens", hidden), dtype),
            *([GraphIO("image_newline", (hidden,), dtype, "LLaVA-NeXT row end")] if newline else []),
        ),
    )


def _tile_graph(config, dtype: str) -> Graph:
    """Idefics3 / SmolVLM: the real tiles of the processor's split and their pixel masks."""
    size, hidden = config.vision_config.image_size, config.text_config.hidden_size
    return Graph(
        "vision_encoder",
        GRAPHS[0],
        inputs=(
            GraphIO("pixel_values", ("tiles", 3, size, size), dtype),
            GraphIO("pixel_attention_mask", ("tiles", size, size), "bool"),
        ),
        outputs=(GraphIO("image_features", ("tiles", "image_tokens", hidden), dtype),),
    )


def _patch_graph(config, dtype: str) -> Graph:
    """Qwen2-VL / Qwen2.5-VL: patches, and what the runner computes from image_grid_thw (patches = merge^2 units)."""
    vision, hidden = config.vision_config, config.text_config.hidden_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return Graph(
        "vision_encoder",
        GRAPHS[0],
        inputs=(
            GraphIO("pixel_values", ("patches", patch_dim), dtype),
            GraphIO("position_ids", ("patches", 2), "int64", "row, column of each patch"),
            GraphIO("window_index", ("units",), "int64", "merge units in window order"),
            GraphIO("window_mask", ("patches", "patches"), "bool", "same window, window order"),
            GraphIO("full_mask", ("patches", "patches"), "bool", "same frame, window order"),
        ),
        outputs=(GraphIO("image_features", ("units", hidden), dtype),),
        doc="inputs from image_grid_thw: shortv_export.onnx_runtime.qwen_vision_inputs",
    )


def _embed_graph(config, dtype: str) -> Graph:
    return Graph(
        "embed_tokens",
        GRAPHS[1],
        inputs=(GraphIO("input_ids", ("batch", "seq"), "int64"),),
        outputs=(GraphIO("inputs_embeds", ("batch", "seq", config.text_config.hidden_size), dtype),),
    )


_TEXT_INDEX_DOC = (
    "positions (0..seq-1) of each row's non-image tokens in order; a row with fewer repeats its last one. Frozen "
    "layers compute queries, O and the MLP for these rows only. Decode: arange(seq)."
)


def _decoder_graph(config, dtype: str, num_layers: int, mrope: bool, prune: dict | None = None) -> Graph:
    """The decoder's inputs and outputs; with ``prune`` (FastV / VTW from layer K) also the visual mask in, the
    pruned layers' key mask in and out, and those layers' cache at its own length."""
    text = config.text_config
    hidden, heads, head_dim = text.hidden_size, text.num_key_value_heads, _head_dim(text)
    if mrope:
        doc = "M-RoPE (temporal, height, width) as get_rope_index makes them; decode: last + 1"
        positions = GraphIO("position_ids", (3, "batch", "seq"), "int64", doc)
    else:
        positions = GraphIO("position_ids", ("batch", "seq"), "int64", "cumsum(attention_mask) - 1")
    mask_doc = "1 = attend, 0 = padding"
    past = per_layer(GraphIO("past_key_values.{i}.{kv}", ("batch", heads, "past", head_dim), dtype), num_layers)
    present = per_layer(GraphIO("present.{i}.{kv}", ("batch", heads, "past + seq", head_dim), dtype), num_layers)
    pruning_in, pruning_out = [], []
    if prune:
        first = 2 * prune["layer"]
        pruned_past, pruned_total = (
            ("batch", heads, "pruned_past", head_dim),
            ("batch", heads, "pruned_past + kept", head_dim),
        )
        past[first:] = [replace(io, shape=pruned_past) for io in past[first:]]
        present[first:] = [replace(io, shape=pruned_total) for io in present[first:]]
        pruning_in = [
            GraphIO("visual_mask", ("batch", "seq"), "bool", _VISUAL_MASK_DOC),
            GraphIO("kept_valid", ("batch", "kept"), "bool", _KEPT_VALID_DOC),
            GraphIO("pruned_past_mask", ("batch", "pruned_past"), "int64", _PRUNED_MASK_DOC),
        ]
        doc = "pruned_past_mask for the next call: the kept rows' entries appended (kept: this call's kept rows)"
        pruning_out = [GraphIO("pruned_mask", ("batch", "pruned_past + kept"), "int64", doc)]
    return Graph(
        "decoder",
        GRAPHS[2],
        inputs=(
            GraphIO("inputs_embeds", ("batch", "seq", hidden), dtype),
            GraphIO("attention_mask", ("batch", "past + seq"), "int64", mask_doc, graph_names={1: "total"}),
            positions,
            GraphIO("text_index", ("batch", "text"), "int64", _TEXT_INDEX_DOC),
            *pruning_in,
            *past,
        ),
        outputs=(
            GraphIO("logits", ("batch", 1, text.vocab_size), dtype, "last position only"),
            GraphIO("last_hidden_state", ("batch", "seq", hidden), dtype, "after the norm"),
            *pruning_out,
            *present,
        ),
    )


_VISUAL_MASK_DOC = (
    "True on the rows of image tokens: FastV ranks them by the attention of each row's last token in layer K-1 and "
    "keeps the highest from layer K on; VTW removes them all there. Decode: all False"
)
_KEPT_VALID_DOC = (
    "True on each row's first T + k slots, padded with False to the widest row: T its text (and padding) tokens, k "
    "the image tokens it keeps, round((1 - R) x its image tokens) in float32 (half to even) for FastV, 0 for VTW. "
    "The graph ranks which image tokens; this gives how many, and its width sizes the pruned layers' rows. Decode: "
    "all True"
)
_PRUNED_MASK_DOC = (
    "1 = attend: the keys that the layers from K on hold from earlier calls (their past is the kept rows only, "
    "padded per row); the previous call's pruned_mask. Prefill: [batch, 0]"
)


def _export_vision(model, out: Path) -> dict:
    if _graph_kind(model) == "tiled":
        return _export_tiles(model, out)
    if _graph_kind(model) == "mrope":
        return _export_windowed(model, out)
    module = _VisionEncoder(model)
    size = model.config.vision_config.image_size
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(2, 3, size, size, dtype=dtype)
    graph = _image_graph(model.config, _name(dtype), newline=module.image_newline is not None)
    _export(module, (pixels,), out, graph)
    return graph.spec()


def _export_tiles(model, out: Path) -> dict:
    module = _TileEncoder(model)
    size = model.config.vision_config.image_size
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(2, 3, size, size, dtype=dtype)
    mask = torch.ones(2, size, size, dtype=torch.bool)
    mask[1, :, size // 2 :] = False  # a padded tile, so the graph keeps the mask's path
    graph = _tile_graph(model.config, _name(dtype))
    _export(module, (pixels, mask), out, graph)
    return graph.spec()


def _export_windowed(model, out: Path) -> dict:
    module = _WindowedVisionEncoder(model)
    vision = model.config.vision_config
    dtype = next(model.parameters()).dtype
    grid = [[1, 8, 8], [1, 4, 12]]  # two images, one square, one wide: several windows and frames
    feeds = qwen_vision_inputs(grid, vision.spatial_merge_size, getattr(vision, "window_size", None), vision.patch_size)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(len(feeds["position_ids"]), patch_dim, dtype=dtype)
    args = (pixels, *(torch.from_numpy(feeds[k]) for k in ("position_ids", "window_index", "window_mask", "full_mask")))
    units = torch.export.Dim("units", min=1)
    graph = _patch_graph(model.config, _name(dtype))
    _export(module, args, out, graph, {"units": units, "patches": vision.spatial_merge_size**2 * units})
    return graph.spec()


def _export_embed(model, out: Path) -> dict:
    graph = _embed_graph(model.config, _name(next(model.parameters()).dtype))
    _export(_Embed(model), (torch.zeros(2, 7, dtype=torch.long),), out, graph)
    return graph.spec()


def _export_decoder(model, out: Path) -> dict:
    prune = getattr(model.config, "shortv_prune", None)
    module = _PrunedDecoder(model) if prune else _Decoder(model)
    text = model.config.text_config
    dtype = next(model.parameters()).dtype
    batch, past, seq = 2, 3, 7  # no 0 or 1: those sizes would be specialised
    embeds = torch.randn(batch, seq, text.hidden_size, dtype=dtype)
    attention = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, -1).contiguous()
    mrope = _graph_kind(model) == "mrope"
    if mrope:  # temporal, height, width rows
        positions = positions.expand(3, -1, -1).contiguous()
    text_index = torch.tensor([[0, 1, 4, 5, 6], [0, 3, 4, 6, 6]])
    cache_shape = (batch, text.num_key_value_heads, past, _head_dim(text))
    caches = [torch.randn(*cache_shape, dtype=dtype) for _ in range(2 * module.num_layers)]
    pruned = []
    if prune:  # the rows text_index leaves out are visual; the pruned layers hold 2 keys from before
        visual = torch.ones(batch, seq, dtype=torch.bool).scatter(1, text_index, False)
        kept = torch.from_numpy(kept_slots(visual.numpy(), prune.get("ratio")))
        pruned = [visual, kept, torch.ones(batch, 2, dtype=torch.long)]
        for i in range(2 * prune["layer"], len(caches)):
            caches[i] = caches[i][:, :, :2].contiguous()
    graph = _decoder_graph(model.config, _name(dtype), module.num_layers, mrope, prune)
    # The axes named once for all inputs: tracing then has a few symbols where free axes would start with one per
    # tensor dimension, to be unified by guards (a third of the export time of a tiny model)
    dims = {"batch": 1, "seq": 1, "past": 0, "text": 0, "kept": 1, "pruned_past": 0}
    dims = {name: torch.export.Dim(name, min=low) for name, low in dims.items()}
    _export(module, (embeds, attention, positions, text_index, *pruned, *caches), out, graph, dims)
    return graph.spec()


def _head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
