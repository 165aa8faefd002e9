"""ShortV for LLaVA and LLaVA-NeXT (Yuan et al., 2025, arXiv 2504.00502).

In the decoder layers listed in ``config.shortv_layers`` visual tokens are *frozen* during prefill: keys and
values are still computed for every position (and cached), but only text positions are queries and go
through ``o_proj`` and the MLP; visual positions leave the layer with the hidden state they entered with.
Because attention is causal and K/V come from the layer input, text outputs equal those of the dense layer.

Visual rows are the positions whose ``input_ids`` equal ``config.image_token_id`` (with ``inputs_embeds``: the
positions holding that token's embedding, as LLaVA finds them) in a call that carries images (``pixel_values``
or pre-computed image features). Calls without images (decode steps, text-only prompts) run the stock layers,
with no branching on tensor values, so they compile with ``torch.compile(fullgraph=True)``.

A frozen layer attends with the mask the stock text model gives that layer (causal, or sliding-window for
Mistral and for Qwen2's sliding layers), restricted to the text rows. Text models: Llama, Mistral, Qwen2.
With ``shortv_layers=[]`` the model is stock LLaVA. Runs on transformers 5.23 (cache argument
``past_key_values``) and 5.24+ (``cache``); ``config.shortv_transformers`` records the versions it was checked on.
"""

import re

import torch
import transformers
from torch import nn
from transformers import (
    DynamicCache,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
)
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    eager_attention_forward,
    rotate_half,
)
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer
from transformers.utils import logging

from .configuration_shortv_llava import ShortVLlavaConfig, ShortVLlavaNextConfig

logger = logging.get_logger(__name__)

# Attention backends that take the explicit [batch, 1, queries, keys] mask a frozen layer needs.
_MASKED_BACKENDS = ("eager", "sdpa")
MASK_FUNCTIONS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


def attention_types(text_config) -> list[str]:
    """The mask each decoder layer attends with in the stock text model (Llama, Mistral, Qwen2 ``forward``)."""
    if text_config.model_type == "qwen2":
        return list(text_config.layer_types)
    sliding = text_config.model_type == "mistral" and text_config.sliding_window is not None
    return ["sliding_attention" if sliding else "full_attention"] * text_config.num_hidden_layers


def _pop_cache(kwargs: dict):
    """The KV cache, passed as ``cache`` (transformers >= 5.24) or ``past_key_values`` (5.23)."""
    cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def _rope(x, cos, sin):  # cos, sin: [B, 1, S, head_dim]
    return x * cos + rotate_half(x) * sin


class ShortVAttention:
    """Mixin over a stock attention: with ``shortv``, queries (and ``o_proj``) for the text rows only."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, shortv=None, **kwargs):
        if shortv is None:
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
        cache = _pop_cache(kwargs)
        batch, seq, _ = hidden_states.shape
        index = shortv["index"]  # [B, T, D]
        n_text = index.shape[1]

        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        key = _rope(key, *(t.unsqueeze(1) for t in position_embeddings))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if n_text == 0:  # only image tokens here (a prefill chunk): nothing is a query
            return hidden_states.new_zeros(batch, 0, self.o_proj.out_features), None
        query = self.q_proj(hidden_states.gather(1, index)).view(batch, n_text, -1, self.head_dim).transpose(1, 2)
        query = _rope(query, *shortv["position_embeddings"])

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
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
            rows = shortv["index"][:, None, :, :1].expand(-1, weights.shape[1], -1, weights.shape[-1])
            weights = weights.new_zeros(batch, weights.shape[1], seq, weights.shape[-1]).scatter(2, rows, weights)
        return out, weights


class ShortVDecoderLayer:
    """Mixin over a stock decoder layer: with ``shortv``, the frozen branch, in the stock layer's order.

    ``shortv`` holds what all frozen layers of one forward share: ``layers`` (the ids frozen in this call; any
    other layer runs the stock code), ``index`` [B, T, D] (each row's text positions
    first, padded with visual positions, expanded over the hidden size), ``valid`` [B, T, 1] (False on that
    padding, or None), ``masks`` (attention type -> the [B, 1, T, K] mask rows of the text queries) and
    ``position_embeddings`` (cos, sin of the text rows, [B, 1, T, head_dim]). The fallback for other attention
    backends gets ``visual`` [B, S] only: the dense layer, visual rows reset (exact, but nothing saved).
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
        attn_out, _ = self.self_attn(
            hidden_states=normed, attention_mask=shortv["masks"][self.attention_type], shortv=shortv, **kwargs
        )
        text = residual + attn_out
        text = text + self.mlp(self.post_attention_layernorm(text))
        if shortv["valid"] is not None:  # padding entries point at visual rows: write those back unchanged
            text = torch.where(shortv["valid"], text, residual)
        return hidden_states.scatter(1, index, text)


class ShortVLlamaAttention(ShortVAttention, LlamaAttention):
    pass


class ShortVMistralAttention(ShortVAttention, MistralAttention):
    pass


class ShortVQwen2Attention(ShortVAttention, Qwen2Attention):
    pass


class ShortVLlamaDecoderLayer(ShortVDecoderLayer, LlamaDecoderLayer):
    attention_class = ShortVLlamaAttention


class ShortVMistralDecoderLayer(ShortVDecoderLayer, MistralDecoderLayer):
    attention_class = ShortVMistralAttention


class ShortVQwen2DecoderLayer(ShortVDecoderLayer, Qwen2DecoderLayer):
    attention_class = ShortVQwen2Attention


FROZEN_LAYERS = {
    "llama": ShortVLlamaDecoderLayer,
    "mistral": ShortVMistralDecoderLayer,
    "qwen2": ShortVQwen2DecoderLayer,
}


def text_rows_inputs(language_model, layers, text_index, valid, masks, position_ids) -> dict:
    """The ``shortv`` argument of the frozen ``layers`` from the text rows ``text_index`` [B, T], their ``valid`` flags
    [B, T] (or None) and their ``masks`` (attention type -> [B, 1, T, K]). The text rows' cos/sin are those the
    text model computes for all rows at ``position_ids`` [B or 1, S], gathered."""
    batch = text_index.shape[0]
    hidden = language_model.config.hidden_size
    dtype = language_model.embed_tokens.weight.dtype
    probe = torch.empty(batch, position_ids.shape[-1], 0, dtype=dtype, device=text_index.device)
    position_embeddings = language_model.rotary_emb(probe, position_ids)
    rows = text_index.unsqueeze(-1)
    cos, sin = (t.expand(batch, -1, -1).gather(1, rows.expand(-1, -1, t.shape[-1])) for t in position_embeddings)
    return {
        "layers": frozenset(layers),
        "index": rows.expand(-1, -1, hidden),
        "valid": None if valid is None else valid.unsqueeze(-1),
        "masks": masks,
        "position_embeddings": (cos.unsqueeze(1), sin.unsqueeze(1)),  # [B, 1, T, head_dim], as applied to heads
    }


class ShortVModelMixin:
    """Plumbing shared by the LLaVA and LLaVA-NeXT models: build the frozen layers, find the visual rows."""

    def _shortv_init(self):
        self.shortv_layers = list(self.config.shortv_layers or [])
        text_config = self.language_model.config
        layer_class = FROZEN_LAYERS.get(text_config.model_type)
        if self.shortv_layers and layer_class is None:
            raise ValueError(
                f"ShortV supports the text models {', '.join(FROZEN_LAYERS)}, not {text_config.model_type!r}"
            )
        for i in self.shortv_layers:
            self.language_model.layers[i] = layer_class(text_config, i)
        if self.shortv_layers:
            self._no_split_modules.add(layer_class.__name__)
        _warn_if_untested(self.config)

    def _shortv_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, n_visual):
        """The ``shortv`` argument of the frozen layers in a call with ``n_visual`` image features."""
        embed = self.get_input_embeddings()
        if input_ids is not None:
            visual = input_ids == self.config.image_token_id
        else:  # visual rows still hold the image token's embedding here
            token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            visual = (inputs_embeds == embed(token)).all(-1)
        text_config = self.language_model.config
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
        if position_ids is None:  # as the stock text model makes them
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(seq, device=visual.device) + past).unsqueeze(0)

        # Each attention type's mask, as the stock text model builds it; explicit, because SDPA may otherwise get
        # None ("is_causal"), which aligns a subset of queries wrongly. Then the text queries' rows of it, additive
        # (SDPA would turn a boolean mask into this in every layer).
        dtype = embed.weight.dtype
        probe = torch.empty(batch, seq, 0, dtype=dtype, device=visual.device)
        masks = {}
        for kind in {self.language_model.layers[i].attention_type for i in self.shortv_layers}:
            mask = attention_mask.get(kind) if isinstance(attention_mask, dict) else None
            if mask is None:
                padding = None if isinstance(attention_mask, dict) else attention_mask
                mask = MASK_FUNCTIONS[kind](
                    text_config, probe, padding, cache, position_ids=position_ids, allow_is_causal_skip=False
                )
            mask = mask.expand(batch, -1, -1, -1)
            mask = mask.gather(2, text_index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            masks[kind] = mask
        return text_rows_inputs(self.language_model, self.shortv_layers, text_index, valid, masks, position_ids)

    def forward(self, input_ids=None, pixel_values=None, *, attention_mask=None, position_ids=None, **kwargs):
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        has_pixels = pixel_values is not None and pixel_values.shape[0] > 0
        if self.shortv_layers and (has_pixels or encoded.get("image") is not None):
            if encoded.get("image") is None:  # encode here, as the stock forward would, to count the features
                flags = {k: kwargs[k] for k in ("output_attentions", "output_hidden_states") if k in kwargs}
                encoded["image"] = self.get_image_features(
                    pixel_values=pixel_values,
                    image_sizes=kwargs.get("image_sizes"),
                    vision_feature_layer=kwargs.get("vision_feature_layer"),
                    vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                    return_dict=True,
                    **flags,
                )
                pixel_values, kwargs["mm_encoder_outputs"] = None, encoded
            hidden = self.language_model.config.hidden_size
            n_visual = sum(features.numel() for features in encoded["image"].pooler_output) // hidden
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            use_cache = kwargs.get("use_cache")
            if cache is None and (self.language_model.config.use_cache if use_cache is None else use_cache):
                cache = DynamicCache(config=self.language_model.config)  # masks as the text model builds them
            kwargs["shortv"] = self._shortv_inputs(
                input_ids, kwargs.get("inputs_embeds"), attention_mask, position_ids, cache, n_visual
            )
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **kwargs,
        )


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


class ShortVLlavaModel(ShortVModelMixin, LlavaModel):
    config_class = ShortVLlavaConfig

    def __init__(self, config: ShortVLlavaConfig):
        super().__init__(config)
        self._shortv_init()


class ShortVLlavaNextModel(ShortVModelMixin, LlavaNextModel):
    config_class = ShortVLlavaNextConfig

    def __init__(self, config: ShortVLlavaNextConfig):
        super().__init__(config)
        self._shortv_init()


class ShortVLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with visual tokens frozen in ``config.shortv_layers`` (see the module docstring)."""

    config_class = ShortVLlavaConfig

    def __init__(self, config: ShortVLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)  # the stock __init__ would build a stock LlavaModel
        self.model = ShortVLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


class ShortVLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with visual tokens frozen in ``config.shortv_layers`` (see the module docstring)."""

    config_class = ShortVLlavaNextConfig

    def __init__(self, config: ShortVLlavaNextConfig):
        LlavaNextPreTrainedModel.__init__(self, config)  # the stock __init__ would build a stock LlavaNextModel
        self.model = ShortVLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# llava-hf checkpoints store legacy weight names that transformers renames on load for the `llava` and
# `llava_next` model types (and the LlavaModel class); give our model types and classes the same renames.
for _ours, _stock in (
    ("shortv_llava", "llava"),
    ("shortv_llava_next", "llava_next"),
    ("ShortVLlavaModel", "LlavaModel"),
    ("ShortVLlavaNextModel", "LlavaNextModel"),
):
    if get_checkpoint_conversion_mapping(_ours) is None and get_checkpoint_conversion_mapping(_stock):
        register_checkpoint_conversion_mapping(_ours, get_checkpoint_conversion_mapping(_stock))
