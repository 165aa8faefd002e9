"""ShortV (Yuan et al., 2025, arXiv 2504.00502): the frozen decoder layer, shared by every family.

In the decoder layers listed in ``config.shortv_layers`` visual tokens are *frozen* during prefill: keys and
values are still computed for every position (and cached), but only text positions are queries and go
through ``o_proj`` and the MLP; visual positions leave the layer with the hidden state they entered with.
Because attention is causal and K/V come from the layer input, text outputs equal those of the dense layer.

Visual rows are the positions holding one of the family's visual placeholder tokens (``visual_token_keys`` of
the model class: the image token, and the video token where the family has videos), in a call that carries
images or videos (pixel values or pre-computed encoder outputs). Calls without them (decode steps, text-only
prompts) run the stock layers, with no branching on tensor values, so they compile with ``fullgraph=True``.

A frozen layer attends with the mask the stock text model gives that layer's text rows (causal, or sliding
window for Mistral and the sliding layers of Qwen2 and Gemma 3), and rotates its text queries with the cos/sin
the stock text model computed for those rows (1-D RoPE, or Qwen2-VL's multimodal RoPE alike). Text models:
Llama, Mistral, Qwen2, Gemma 3 and the Qwen2-VL / Qwen2.5-VL / Qwen3-VL text models. With ``shortv_layers=[]``
the model is the stock one. Runs on transformers 5.23 (cache argument ``past_key_values``) and 5.24+
(``cache``); ``config.shortv_transformers`` records the versions it was checked on.
"""

import functools
import inspect
import re

import torch
import transformers
from torch import nn
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3DecoderLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    eager_attention_forward,
    rotate_half,
)
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention, Qwen2_5_VLDecoderLayer
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLAttention, Qwen2VLDecoderLayer
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextAttention, Qwen3VLTextDecoderLayer
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Attention backends that take the explicit [batch, 1, queries, keys] mask a frozen layer needs.
_MASKED_BACKENDS = ("eager", "sdpa")
MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
_LAYER_TYPED = ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "gemma3_text")  # text models that follow layer_types


def attention_types(text_config) -> list[str]:
    """The mask each decoder layer attends with in the stock text model (its ``forward``)."""
    if text_config.model_type in _LAYER_TYPED:
        return list(text_config.layer_types)
    sliding = text_config.model_type == "mistral" and text_config.sliding_window is not None
    return ["sliding_attention" if sliding else "full_attention"] * text_config.num_hidden_layers


def _pop_cache(kwargs: dict):
    """The KV cache, passed as ``cache`` (transformers >= 5.24) or ``past_key_values`` (5.23)."""
    cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def _rope(x, cos, sin):  # cos, sin: [B, 1, S, head_dim]
    return x * cos + rotate_half(x) * sin


def _text_rows(shortv, position_embeddings, kind):
    """cos, sin of the text rows [B, 1, T, head_dim] for layers of attention type ``kind``, gathered once per
    forward from the stock model's cos/sin of all rows [B or 1, S, head_dim] (whatever RoPE made them; Gemma 3
    has one per attention type) and kept in ``shortv``."""
    cached = shortv["position_embeddings"]
    if kind not in cached:
        rows = shortv["index"][..., :1]
        batch = rows.shape[0]
        cached[kind] = tuple(
            t.expand(batch, -1, -1).gather(1, rows.expand(-1, -1, t.shape[-1])).unsqueeze(1)
            for t in position_embeddings
        )
    return cached[kind]


class ShortVAttention:
    """Mixin over a stock attention: with ``shortv``, queries (and ``o_proj``) for the text rows only."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, shortv=None, **kwargs):
        if shortv is None:
            return super().forward(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )
        cache = _pop_cache(kwargs)
        kind = kwargs.pop("attention_type")
        batch, seq, _ = hidden_states.shape
        index = shortv["index"]  # [B, T, D]
        n_text = index.shape[1]
        q_norm, k_norm = self._modules.get("q_norm"), self._modules.get("k_norm")  # Gemma 3, Qwen3: per head

        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if k_norm is not None:
            key = k_norm(key)
        key = _rope(key, *(t.unsqueeze(1) for t in position_embeddings))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if n_text == 0:  # only visual tokens here (a prefill chunk): nothing is a query
            return hidden_states.new_zeros(batch, 0, self.o_proj.out_features), None
        query = self.q_proj(hidden_states.gather(1, index)).view(batch, n_text, -1, self.head_dim).transpose(1, 2)
        if q_norm is not None:
            query = q_norm(query)
        query = _rope(query, *_text_rows(shortv, position_embeddings, kind))

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        kwargs.pop("position_ids", None)
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        out = self.o_proj(out.reshape(batch, n_text, -1))
        if weights is not None:  # line up with the stock layer's maps: [B, heads, S, K], zero on visual rows
            if shortv["valid"] is not None:
                weights = weights * shortv["valid"].unsqueeze(1)
            rows = index[:, None, :, :1].expand(-1, weights.shape[1], -1, weights.shape[-1])
            weights = weights.new_zeros(batch, weights.shape[1], seq, weights.shape[-1]).scatter(2, rows, weights)
        return out, weights


class ShortVDecoderLayer:
    """Mixin over a stock decoder layer: with ``shortv``, the frozen branch, in the stock layer's order.

    ``shortv`` holds what all frozen layers of one forward share: ``layers`` (the ids frozen in this call; any
    other layer runs the stock code), ``index`` [B, T, D] (each row's text positions first, padded with visual
    positions, expanded over the hidden size), ``valid`` [B, T, 1] (False on that padding, or None), ``masks``
    (attention type -> the [B, 1, T, K] mask rows of the text queries) and ``position_embeddings`` (attention
    type -> cos, sin of the text rows, [B, 1, T, head_dim]; gathered by the first frozen layer of that type when
    missing). The fallback for other attention backends gets ``visual`` [B, S] only: the dense layer, visual
    rows reset (exact, nothing saved).
    """

    attention_class: type  # the family's attention with the ShortVAttention mixin

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = self.attention_class(config, layer_idx)
        self.attention_type = attention_types(config)[layer_idx]

    def forward(self, hidden_states, attention_mask=None, shortv=None, **kwargs):
        if shortv is None or self.self_attn.layer_idx not in shortv["layers"]:
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        if "visual" in shortv:  # the fallback: dense layer, visual rows reset
            out = super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
            return torch.where(shortv["visual"].unsqueeze(-1), hidden_states, out)
        index = shortv["index"]
        residual = hidden_states.gather(1, index)
        normed = self.input_layernorm(hidden_states)
        kind = self.attention_type
        attn_out, _ = self.self_attn(
            hidden_states=normed, attention_mask=shortv["masks"][kind], shortv=shortv, attention_type=kind, **kwargs
        )
        text = self.text_update(residual, attn_out)
        if shortv["valid"] is not None:  # padding entries point at visual rows: write those back unchanged
            text = torch.where(shortv["valid"], text, residual)
        return hidden_states.scatter(1, index, text)

    def text_update(self, residual, attn_out):
        """The text rows after the layer, from their input and their attention output, in the stock layer's order
        (pre-norm: attention, then the MLP, each added to the residual)."""
        text = residual + attn_out
        return text + self.mlp(self.post_attention_layernorm(text))


class ShortVLlamaAttention(ShortVAttention, LlamaAttention):
    pass


class ShortVMistralAttention(ShortVAttention, MistralAttention):
    pass


class ShortVQwen2Attention(ShortVAttention, Qwen2Attention):
    pass


class ShortVQwen2VLAttention(ShortVAttention, Qwen2VLAttention):
    pass


class ShortVQwen2_5_VLAttention(ShortVAttention, Qwen2_5_VLAttention):
    pass


class ShortVGemma3Attention(ShortVAttention, Gemma3Attention):
    pass


class ShortVQwen3VLTextAttention(ShortVAttention, Qwen3VLTextAttention):
    pass


class ShortVLlamaDecoderLayer(ShortVDecoderLayer, LlamaDecoderLayer):
    attention_class = ShortVLlamaAttention


class ShortVMistralDecoderLayer(ShortVDecoderLayer, MistralDecoderLayer):
    attention_class = ShortVMistralAttention


class ShortVQwen2DecoderLayer(ShortVDecoderLayer, Qwen2DecoderLayer):
    attention_class = ShortVQwen2Attention


class ShortVQwen2VLDecoderLayer(ShortVDecoderLayer, Qwen2VLDecoderLayer):
    attention_class = ShortVQwen2VLAttention


class ShortVQwen2_5_VLDecoderLayer(ShortVDecoderLayer, Qwen2_5_VLDecoderLayer):
    attention_class = ShortVQwen2_5_VLAttention


class ShortVQwen3VLTextDecoderLayer(ShortVDecoderLayer, Qwen3VLTextDecoderLayer):
    attention_class = ShortVQwen3VLTextAttention


class ShortVGemma3DecoderLayer(ShortVDecoderLayer, Gemma3DecoderLayer):
    attention_class = ShortVGemma3Attention

    def text_update(self, residual, attn_out):
        """Gemma 3's sandwich norms: a norm after attention and around the MLP, each before its residual add."""
        text = residual + self.post_attention_layernorm(attn_out)
        return text + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(text)))


FROZEN_LAYERS = {  # text model_type -> its decoder layer with the frozen branch
    "llama": ShortVLlamaDecoderLayer,
    "mistral": ShortVMistralDecoderLayer,
    "qwen2": ShortVQwen2DecoderLayer,
    "qwen2_vl_text": ShortVQwen2VLDecoderLayer,
    "qwen2_5_vl_text": ShortVQwen2_5_VLDecoderLayer,
    "qwen3_vl_text": ShortVQwen3VLTextDecoderLayer,
    "gemma3_text": ShortVGemma3DecoderLayer,
}


def text_rows_inputs(language_model, layers, text_index, valid, masks, position_ids=None) -> dict:
    """The ``shortv`` argument of the frozen ``layers`` from the text rows ``text_index`` [B, T], their ``valid`` flags
    [B, T] (or None) and their ``masks`` (attention type -> [B, 1, T, K]). With ``position_ids`` [B or 1, S] the text
    rows' cos/sin are computed here (as the text model computes them for all rows, gathered); without, the first
    frozen layer gathers them from the cos/sin the text model hands it."""
    hidden = language_model.config.hidden_size
    rows = text_index.unsqueeze(-1)
    shortv = {
        "layers": frozenset(layers),
        "index": rows.expand(-1, -1, hidden),
        "valid": None if valid is None else valid.unsqueeze(-1),
        "masks": masks,
        "position_embeddings": {},  # attention type -> cos, sin of the text rows, filled by the first layer of it
    }
    if position_ids is not None:  # one RoPE for every attention type (the families ONNX exports)
        dtype = language_model.embed_tokens.weight.dtype
        probe = torch.empty(text_index.shape[0], position_ids.shape[-1], 0, dtype=dtype, device=text_index.device)
        rope = language_model.rotary_emb(probe, position_ids)
        for kind in masks:
            _text_rows(shortv, rope, kind)
    return shortv


def _count(features, hidden: int) -> int:
    """Feature vectors in an encoder output's ``pooler_output`` (a tensor, or a list of per-image tensors)."""
    if isinstance(features, torch.Tensor):
        return features.numel() // hidden
    return sum(f.numel() for f in features) // hidden


class ShortVModelMixin:
    """Plumbing shared by every family's model: build the frozen layers, find the visual rows, build ``shortv``.

    A family's model class sets ``visual_token_keys`` (config fields of its visual placeholder tokens),
    ``pixel_keys`` (forward arguments that carry pixels) and ``encode(inputs)`` (the family's own encoder calls,
    as its stock ``forward`` makes them: modality -> encoder output). The mixin encodes the images first, so the
    number of visual rows is known on the host, and hands the outputs on as ``mm_encoder_outputs``.
    """

    visual_token_keys = ("image_token_id",)
    pixel_keys = ("pixel_values",)

    def __init__(self, config):
        super().__init__(config)
        self._shortv_init()

    def shortv_text_model(self):
        """The decoder: ``language_model`` (LLaVA, Qwen2-VL) or ``text_model`` (Idefics3, SmolVLM)."""
        return self.language_model if "language_model" in self._modules else self.text_model

    def _shortv_init(self):
        self.shortv_layers = list(self.config.shortv_layers or [])
        text_model = self.shortv_text_model()
        text_config = text_model.config
        layer_class = FROZEN_LAYERS.get(text_config.model_type)
        if self.shortv_layers and layer_class is None:
            raise ValueError(
                f"ShortV supports the text models {', '.join(FROZEN_LAYERS)}, not {text_config.model_type!r}"
            )
        self._shortv_attention_types = attention_types(text_config)
        for i in self.shortv_layers:
            text_model.layers[i] = layer_class(text_config, i)
        if self.shortv_layers:
            self._no_split_modules.add(layer_class.__name__)
        # positional arguments of the stock forward, by name (generate and users pass keywords; some pass a few)
        self._shortv_arg_names = tuple(inspect.signature(super().forward).parameters)
        _warn_if_untested(self.config)

    def _visual_ids(self) -> list[int]:
        return [
            getattr(self.config, key) for key in self.visual_token_keys if getattr(self.config, key, None) is not None
        ]

    def _shortv_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, n_visual, new_cache):
        """The ``shortv`` argument of the frozen layers in a call with ``n_visual`` visual features; ``new_cache``:
        no cache was passed and the text model will make an (empty) one."""
        embed = self.get_input_embeddings()
        # Compared one id at a time: a tensor of the ids would be a blocking host-to-device copy on a GPU.
        if input_ids is not None:
            visual = functools.reduce(torch.logical_or, (input_ids == i for i in self._visual_ids()))
        else:  # visual rows still hold the placeholder token's embedding here
            placeholders = (embed(torch.full((), i, device=inputs_embeds.device)) for i in self._visual_ids())
            visual = functools.reduce(torch.logical_or, ((inputs_embeds == e).all(-1) for e in placeholders))
        text_model = self.shortv_text_model()
        text_config = text_model.config
        if text_config._attn_implementation not in _MASKED_BACKENDS:
            logger.warning_once(
                f"ShortV: attention '{text_config._attn_implementation}' takes no per-query mask; frozen layers "
                "fall back to the dense layer with visual rows reset (exact, but no compute saved). Use 'sdpa' "
                "or 'eager' for the speed-up."
            )
            return {"layers": frozenset(self.shortv_layers), "visual": visual}

        batch, seq = visual.shape
        if batch == 1:  # known on the host: no device sync, and a fixed shape for torch.compile
            width, valid = seq - n_visual, None
        else:  # the widest row sets the width (one sync); narrower rows are padded with visual positions
            n_text = (~visual).sum(1)
            width = int(n_text.max())
            valid = torch.arange(width, device=visual.device) < n_text.unsqueeze(1)
        # Text positions of each row first, in order, then its visual positions (stable sort).
        text_index = torch.argsort(visual.to(torch.int8), dim=1, stable=True)[:, :width]
        # The 1-D positions the stock mask functions see: 2-D position ids, or the text row of packed 3-D ones.
        if position_ids is not None and position_ids.ndim == 3:
            position_ids = position_ids[0] if position_ids.shape[0] == 4 else None
        if position_ids is None:  # as the stock text model makes them
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(seq, device=visual.device) + past).unsqueeze(0)

        # Each attention type's mask, as the stock text model builds it; explicit, because SDPA may otherwise get
        # None ("is_causal"), which aligns a subset of queries wrongly. Then the text queries' rows of it, additive
        # (SDPA would turn a boolean mask into this in every layer).
        dtype = embed.weight.dtype
        probe = torch.empty(batch, seq, 0, dtype=dtype, device=visual.device)
        masks = {}
        for kind in {self._shortv_attention_types[i] for i in self.shortv_layers}:
            mask = attention_mask.get(kind) if isinstance(attention_mask, dict) else None
            if mask is None:
                padding = None if isinstance(attention_mask, dict) else attention_mask
                # An empty cache sizes the mask as no cache does; but with one, position ids are never read as
                # packed sequences (no mask given), so none are handed over when the text model makes its own.
                mask = MASK_FUNCTIONS[kind](
                    text_config,
                    probe,
                    padding,
                    cache,
                    position_ids=None if new_cache else position_ids,
                    allow_is_causal_skip=False,
                )
            mask = mask.expand(batch, -1, -1, -1)
            mask = mask.gather(2, text_index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            masks[kind] = mask
        return text_rows_inputs(text_model, self.shortv_layers, text_index, valid, masks)

    def encode(self, inputs: dict) -> dict:
        """modality -> encoder output for the pixels in ``inputs`` (the forward's arguments), as the stock
        forward encodes them."""
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        kwargs.update(zip(self._shortv_arg_names[: len(args)], args, strict=True))
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        has_pixels = any(kwargs.get(k) is not None and kwargs[k].shape[0] > 0 for k in self.pixel_keys)
        if self.shortv_layers and (has_pixels or any(v is not None for v in encoded.values())):
            if has_pixels:  # encode here, as the stock forward would, to count the features
                for modality, output in self.encode(kwargs).items():
                    if encoded.get(modality) is None:
                        encoded[modality] = output
                for key in self.pixel_keys:
                    kwargs[key] = None
                kwargs["mm_encoder_outputs"] = encoded
            text_config = self.shortv_text_model().config
            hidden = text_config.hidden_size
            n_visual = sum(_count(out.pooler_output, hidden) for out in encoded.values() if out is not None)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            use_cache = kwargs.get("use_cache")
            if use_cache is None:  # as the stock forwards default it: the model's config, else the text model's
                use_cache = getattr(self.config, "use_cache", None)
            use_cache = text_config.use_cache if use_cache is None else use_cache
            kwargs["shortv"] = self._shortv_inputs(
                kwargs.get("input_ids"),
                kwargs.get("inputs_embeds"),
                kwargs.get("attention_mask"),
                kwargs.get("position_ids"),
                cache,
                n_visual,
                new_cache=cache is None and bool(use_cache),
            )
        return super().forward(**kwargs)


class ShortVForConditionalGenerationMixin:
    """Over a stock ``...ForConditionalGeneration``: its ``__init__`` with ``shortv_model_class`` (the family's
    ShortV model) in place of the stock model, which the stock ``__init__`` would build."""

    shortv_model_class: type

    def __init__(self, config):
        pretrained = next(c for c in type(self).__mro__ if c.__name__.endswith("PreTrainedModel"))
        pretrained.__init__(self, config)  # the family's PreTrainedModel: config, attention backend, ...
        self.model = self.shortv_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


def mirror_weight_renames(pairs) -> None:
    """Hub checkpoints store weight names that transformers renames on load (and back on save) for the stock
    model types and classes; give ours, ``(ours, stock)`` names, the same renames."""
    for ours, stock in pairs:
        if get_checkpoint_conversion_mapping(ours) is None and get_checkpoint_conversion_mapping(stock):
            register_checkpoint_conversion_mapping(ours, get_checkpoint_conversion_mapping(stock))


def _flags(inputs: dict) -> dict:
    """The output flags a stock forward hands its encoders."""
    return {k: inputs[k] for k in ("output_attentions", "output_hidden_states") if k in inputs}


def _minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def _warn_if_untested(config) -> None:
    known = getattr(config, "shortv_transformers", None) or {}
    tested = known.get("tested")
    if not tested:
        return
    running = transformers.__version__
    if not _minor(tested[0]) <= _minor(running) <= _minor(tested[-1]):
        logger.warning_once(
            f"ShortV: this checkpoint's model code was tested with transformers {tested[0]} to {tested[-1]} (it "
            f"was converted with {known.get('converted_with', '?')}); you are running {running}. If outputs look "
            f"wrong, install transformers>={tested[0]},<={tested[-1]}."
        )
