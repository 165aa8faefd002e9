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
the model is the stock one.

Token pruning (``config.shortv_prune``, see ``TokenPruning``): FastV (K, R) removes, from layer K on, the share R
of each prompt's visual tokens that its last prompt token attends to least in layer K-1; VTW (K) removes them all.
The pruned layers run on the kept rows at their original positions and cache only them; ShortV layers among them
freeze the kept visual rows; decode steps attend to what each layer's cache holds.

Runs on transformers 5.23 (cache argument ``past_key_values``) and 5.24+ (``cache``); ``config.shortv_transformers``
records the versions it was checked on.
"""

import functools
import inspect
import re
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3DecoderLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    eager_attention_forward,
    repeat_kv,
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


def _gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` [B, T, 1] of ``t`` [B or 1, S, D] (cos or sin of every position): [B, T, D]."""
    return t.expand(rows.shape[0], -1, -1).gather(1, rows.expand(-1, -1, t.shape[-1]))


@dataclass
class FrozenRows:
    """What the frozen layers of one forward share; the model builds it once per forward (``ShortVModelMixin``).

    ``layers``: the layer ids frozen in this call (any other layer runs the stock code). ``index`` [B, T, D]: each
    row's T text positions first, in order, padded with visual positions where a row has fewer, expanded over the
    hidden size. ``valid`` [B, T, 1]: False on that padding (None when no row is padded). ``masks``: attention type
    -> the rows of the stock model's mask for the text queries, additive, [B, 1, T, K]. The text rows' cos/sin come
    from ``text_position_embeddings``.
    """

    layers: frozenset[int]
    index: torch.Tensor
    valid: torch.Tensor | None
    masks: dict[str, torch.Tensor]
    _cos_sin: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def text_position_embeddings(self, kind: str, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the text rows [B, 1, T, head_dim] for the layers of attention type ``kind``, gathered from
        the stock cos/sin of all rows [B or 1, S, head_dim] (whatever RoPE made them: 1-D, M-RoPE, Gemma 3's one per
        attention type) the first time a layer of that type asks, once per forward."""
        if kind not in self._cos_sin:
            rows = self.index[..., :1]
            self._cos_sin[kind] = tuple(_gather_rows(t, rows).unsqueeze(1) for t in position_embeddings)
        return self._cos_sin[kind]


@dataclass
class DenseFrozenRows:
    """The fallback for attention backends that take no per-query mask (flash attention ...): a frozen layer runs
    the dense layer and resets the ``visual`` [B, S] rows to their input. Exact, but saves nothing."""

    layers: frozenset[int]
    visual: torch.Tensor


@dataclass
class KeptKeys:
    """What a pruned prefill leaves on the KV cache (``cache.shortv_kept``) for the decode steps: the prompt length
    and ``ok`` [B, A], which of the pruned layers' cached prompt keys may be attended to."""

    prompt_length: int
    ok: torch.Tensor


@dataclass
class PrunedRows:
    """The rows the pruned layers (``layer`` and after) run on. In the prefill: ``index`` [B, A, D], each row's
    text and kept visual positions in order, padded with removed positions where a row keeps fewer; ``valid`` [B,
    A, 1] False on that padding (None when no row is padded); ``mask`` [B, 1, A, A] the causal mask among them
    (padding and invalid keys masked; each row may always see itself); ``frozen`` the frozen layers' text rows
    among them (None where no visual token is kept). In a decode step ``index`` is None (every new token is kept)
    and ``mask`` [B, 1, Q, keys] covers what the pruned layers' cache holds."""

    layer: int
    mask: torch.Tensor
    index: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    frozen: FrozenRows | None = None
    kept: KeptKeys | None = None  # what the prefill leaves on the cache
    _cos_sin: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def position_embeddings(self, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept rows' cos, sin [B, A, head_dim], gathered (once per forward) from the stock ones of all rows
        (positions are the original ones)."""
        if self._cos_sin is None:
            rows = self.index[..., :1]
            self._cos_sin = tuple(_gather_rows(t, rows) for t in position_embeddings)
        return self._cos_sin


@dataclass
class TokenPruning:
    """FastV or VTW in one prefill (``config.shortv_prune``); the model builds it once per forward. VTW's ``rows``
    are made at once; FastV's by ``rank``, which layer K-1 calls on its input: the attention its row's last prompt
    token (``query`` [B]) pays every position, after softmax, averaged over heads, ranks the visual positions
    (ties: the earlier first), and the round((1 - ratio) x n) highest are kept, in their original order."""

    layer: int
    ratio: float | None  # FastV's share removed; None for VTW
    visual: torch.Tensor  # [B, S] visual rows
    padding: torch.Tensor | None  # [B, S] True on real tokens; None: no padding
    query: torch.Tensor  # [B] each row's last prompt token
    n_visual: int | None  # visual rows in all, known on the host (a batch of one uses it); None: not known
    frozen_layers: frozenset[int]
    language_model: nn.Module
    rows: PrunedRows | None = None

    def __post_init__(self):
        if self.ratio is None:  # VTW: every visual row goes, no ranking
            self.rows = self.pruned_rows(~self.visual, 0)

    def rank(self, layer: nn.Module, hidden_states, position_embeddings) -> None:
        self.rows = self.pruned_rows(*self.keep(self.attention_weights(layer, hidden_states, position_embeddings)))

    def keep(self, weights: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """[B, S] True on the rows kept from ``layer`` on (text, and the visual rows ``weights`` rank highest), and
        how many visual rows a batch of one keeps (None for a batch, or where ``n_visual`` is not known)."""
        order = self.order(weights.masked_fill(~self.visual, float("-inf")))
        batch, seq = order.shape
        if batch == 1 and self.n_visual is not None:
            n_kept = round((1 - self.ratio) * self.n_visual)
            return (~self.visual).scatter(1, order[:, :n_kept], True), n_kept
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(seq, device=order.device).expand(batch, -1))
        return ~self.visual | (ranks < torch.round((1 - self.ratio) * self.visual.sum(1, keepdim=True))), None

    def order(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, S]: each row's positions by descending ``scores``, ties to the earlier position."""
        return scores.sort(dim=1, descending=True, stable=True).indices

    def attention_weights(self, layer: nn.Module, hidden_states, position_embeddings) -> torch.Tensor:
        """[B, S]: the attention each row's ``query`` position pays every position in ``layer`` (called on the
        layer's input), after softmax, averaged over heads."""
        attn = layer.self_attn
        batch, seq, hidden = hidden_states.shape
        normed = layer.input_layernorm(hidden_states)
        q_norm, k_norm = attn._modules.get("q_norm"), attn._modules.get("k_norm")
        key = attn.k_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        key = _rope(k_norm(key) if k_norm is not None else key, *(t.unsqueeze(1) for t in position_embeddings))
        at = self.query[:, None, None]
        row = normed.gather(1, at.expand(-1, 1, hidden))
        query = attn.q_proj(row).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        cos, sin = (_gather_rows(t, at) for t in position_embeddings)
        query = _rope(q_norm(query) if q_norm is not None else query, cos.unsqueeze(1), sin.unsqueeze(1))
        scores = torch.matmul(query, repeat_kv(key, attn.num_key_value_groups).transpose(2, 3)) * attn.scaling
        seen = torch.arange(seq, device=key.device) <= self.query[:, None]  # causal, as the stock eager map
        if self.padding is not None:
            seen = seen & self.padding
        scores = scores + _additive(seen[:, None, None, :], scores.dtype)
        return nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype).mean(1)[:, 0]

    def pruned_rows(self, keep: torch.Tensor, n_kept: int | None) -> PrunedRows:
        """The ``PrunedRows`` of a prefill that keeps the ``keep`` [B, S] rows (``n_kept`` visual ones, known on
        the host for a batch of one)."""
        index, valid = text_index(~keep, None if n_kept is None else self.n_visual - n_kept)
        n_rows = index.shape[1]
        ok = self.padding.gather(1, index) if self.padding is not None else torch.ones_like(index, dtype=torch.bool)
        if valid is not None:
            ok = ok & valid
        dtype = self.language_model.embed_tokens.weight.dtype
        mask = _additive(seen_among(ok)[:, None], dtype)
        visual = self.visual.gather(1, index)
        frozen = None
        if self.frozen_layers and (n_kept is None or n_kept > 0) and self.ratio is not None:
            t_index, t_valid = text_index(visual, n_kept)
            kind = "full_attention"
            masks = {kind: mask.gather(2, t_index[:, None, :, None].expand(-1, 1, -1, n_rows))}
            frozen = text_rows_inputs(self.language_model, self.frozen_layers, t_index, t_valid, masks)
        hidden = self.language_model.config.hidden_size
        return PrunedRows(
            layer=self.layer,
            mask=mask,
            index=index.unsqueeze(-1).expand(-1, -1, hidden),
            valid=None if valid is None else valid.unsqueeze(-1),
            frozen=frozen,
            kept=KeptKeys(keep.shape[1], ok),
        )


def seen_among(ok: torch.Tensor) -> torch.Tensor:
    """[B, A, A]: which of A rows in position order each one sees, causally, where ``ok`` [B, A] (the keys that
    may be attended to); each row always sees itself."""
    n_rows, device = ok.shape[1], ok.device
    eye = torch.eye(n_rows, dtype=torch.bool, device=device)
    return torch.ones(n_rows, n_rows, dtype=torch.bool, device=device).tril() & (ok[:, None, :] | eye)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean mask (True: may attend) as the additive one eager attention and SDPA take."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def decode_rows(layer: int, kept: KeptKeys, attention_mask, past: int, n_new: int, dtype) -> PrunedRows:
    """The ``PrunedRows`` of a decode step after a pruned prefill: ``n_new`` tokens after ``past`` (the full
    sequence's length so far) see the pruned layers' cached prompt keys ``kept.ok`` and the tokens since."""
    batch, device = kept.ok.shape[0], kept.ok.device
    since = past - kept.prompt_length + n_new  # decoded tokens in the cache after this step's update
    tail = torch.ones(n_new, since, dtype=torch.bool, device=device).tril(since - n_new)
    tail = tail.expand(batch, -1, -1)
    if attention_mask is not None:
        tail = tail & attention_mask[:, None, kept.prompt_length :].bool()
    seen = torch.cat([kept.ok[:, None, :].expand(-1, n_new, -1), tail], dim=-1)
    return PrunedRows(layer=layer, mask=_additive(seen[:, None], dtype))


class ShortVAttention:
    """Mixin over a stock attention: given ``text_index``, queries (and ``o_proj``) for the text rows only.

    ``text_index`` [B, T, D], ``text_position_embeddings`` (their cos, sin) and ``text_valid`` come from the layer's
    ``FrozenRows``; ``attention_mask`` is then the text queries' [B, 1, T, K] mask. Keys and values are computed
    (and cached) for every row. Eager attention returns the stock layer's map (``eager_text_attention``); SDPA none.
    """

    def forward(
        self,
        hidden_states,
        position_embeddings=None,
        attention_mask=None,
        text_index=None,
        text_position_embeddings=None,
        text_valid=None,
        **kwargs,
    ):
        if text_index is None:
            return super().forward(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )
        cache = _pop_cache(kwargs)
        kwargs.pop("position_ids", None)
        batch, seq, _ = hidden_states.shape
        n_text = text_index.shape[1]
        q_norm, k_norm = self._modules.get("q_norm"), self._modules.get("k_norm")  # Gemma 3, Qwen3: per head

        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if k_norm is not None:
            key = k_norm(key)
        key = _rope(key, *(t.unsqueeze(1) for t in position_embeddings))
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        eager = self.config._attn_implementation == "eager"
        if n_text == 0 and not eager:  # only visual tokens here (a prefill chunk): nothing is a query
            return hidden_states.new_zeros(batch, 0, self.o_proj.out_features), None
        query = self.q_proj(hidden_states.gather(1, text_index)).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        if q_norm is not None:
            query = q_norm(query)
        query = _rope(query, *text_position_embeddings)

        if eager:
            out, weights = self.eager_text_attention(query, key, value, attention_mask, text_index, text_valid, seq)
        else:
            attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
            dropout = 0.0 if not self.training else self.attention_dropout
            out, weights = attention(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )
        return self.o_proj(out.flatten(2)), weights

    def eager_text_attention(self, query, key, value, attention_mask, text_index, text_valid, seq):
        """``eager_attention_forward`` for the text queries, returning the map the stock layer returns: [B, heads, S,
        K], zero on visual rows (also with no text row), in the autograd graph of the output like the stock map. The
        text rows' weights are scattered into it before the dropout, and the product with the values reads them back
        (the same output as from the text rows' weights: one scatter and one gather more)."""
        key, value = repeat_kv(key, self.num_key_value_groups), repeat_kv(value, self.num_key_value_groups)
        weights = torch.matmul(query, key.transpose(2, 3)) * self.scaling + attention_mask
        weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        if text_valid is not None:  # padding entries point at visual rows, which stay zero
            weights = weights * text_valid.unsqueeze(1)
        rows = text_index[:, None, :, :1].expand(-1, weights.shape[1], -1, weights.shape[-1])
        full = weights.new_zeros(*weights.shape[:2], seq, weights.shape[-1]).scatter(2, rows, weights)
        full = nn.functional.dropout(full, p=self.attention_dropout if self.training else 0.0, training=self.training)
        return torch.matmul(full.gather(2, rows), value).transpose(1, 2).contiguous(), full


class ShortVDecoderLayer:
    """Mixin over a stock decoder layer: in a layer that ``shortv`` lists, the frozen branch, in the stock layer's
    order (its input norm on every row, attention with text queries, then ``text_update`` on the text rows only,
    scattered back into the unchanged visual rows)."""

    attention_class: type  # the family's attention with the ShortVAttention mixin

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = self.attention_class(config, layer_idx)
        self.attention_type = attention_types(config)[layer_idx]

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        shortv: FrozenRows | DenseFrozenRows | None = None,
        shortv_pruning: TokenPruning | PrunedRows | None = None,
        **kwargs,
    ):
        layer = self.self_attn.layer_idx
        if isinstance(shortv_pruning, TokenPruning):  # a pruned prefill
            if shortv_pruning.rows is None and layer == shortv_pruning.layer - 1:
                shortv_pruning.rank(self, hidden_states, kwargs["position_embeddings"])
            if layer >= shortv_pruning.layer:
                return self.pruned_forward(hidden_states, shortv_pruning.rows, **kwargs)
        elif shortv_pruning is not None and layer >= shortv_pruning.layer:  # a decode step after one
            return super().forward(hidden_states, attention_mask=shortv_pruning.mask, **kwargs)
        if shortv is None or layer not in shortv.layers:
            return super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
        if isinstance(shortv, DenseFrozenRows):
            out = super().forward(hidden_states, attention_mask=attention_mask, **kwargs)
            return torch.where(shortv.visual.unsqueeze(-1), hidden_states, out)
        return self.frozen_forward(hidden_states, shortv, **kwargs)

    def frozen_forward(self, hidden_states, shortv: FrozenRows, **kwargs):
        """The frozen branch: attention with the text rows as queries, then ``text_update`` on them."""
        kind = self.attention_type
        residual = hidden_states.gather(1, shortv.index)
        normed = self.input_layernorm(hidden_states)
        attn_out, _ = self.self_attn(
            hidden_states=normed,
            attention_mask=shortv.masks[kind],
            text_index=shortv.index,
            text_position_embeddings=shortv.text_position_embeddings(kind, kwargs["position_embeddings"]),
            text_valid=shortv.valid,
            **kwargs,
        )
        text = self.text_update(residual, attn_out)
        if shortv.valid is not None:  # padding entries point at visual rows: write those back unchanged
            text = torch.where(shortv.valid, text, residual)
        return hidden_states.scatter(1, shortv.index, text)

    def pruned_forward(self, hidden_states, rows: PrunedRows, position_embeddings=None, position_ids=None, **kwargs):
        """A layer from the first pruned one on, in the prefill: the layer (frozen where it is a ShortV layer) on
        the kept rows only, at their original positions; the removed rows leave it unchanged."""
        kept = hidden_states.gather(1, rows.index)
        kwargs["position_embeddings"] = rows.position_embeddings(position_embeddings)
        if rows.frozen is not None and self.self_attn.layer_idx in rows.frozen.layers:
            out = self.frozen_forward(kept, rows.frozen, **kwargs)
        else:
            out = super().forward(kept, attention_mask=rows.mask, **kwargs)
        if rows.valid is not None:
            out = torch.where(rows.valid, out, kept)
        return hidden_states.scatter(1, rows.index, out)

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


def visual_rows(input_ids, inputs_embeds, embed: nn.Embedding, token_ids: list[int]) -> torch.Tensor:
    """[B, S] True where a row holds one of the visual placeholder ``token_ids``: from ``input_ids``, or where
    ``inputs_embeds`` still hold the placeholder's embedding. Compared one id at a time: a tensor of the ids would be
    a blocking host-to-device copy on a GPU."""
    if input_ids is not None:
        return functools.reduce(torch.logical_or, (input_ids == i for i in token_ids))
    placeholders = (embed(torch.full((), i, device=inputs_embeds.device)) for i in token_ids)
    return functools.reduce(torch.logical_or, ((inputs_embeds == e).all(-1) for e in placeholders))


def text_index(visual: torch.Tensor, n_visual: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's text positions first, in order, then its visual positions, cut to the widest row's text count:
    ``(index [B, T], valid [B, T] or None)``. ``n_visual`` (the features encoded, known on the host) gives T for a
    batch of one with no device sync and a fixed shape for torch.compile; a batch reads its widest row (one sync)
    and marks the visual positions that pad narrower rows as not valid."""
    batch, seq = visual.shape
    if batch == 1:
        width, valid = seq - n_visual, None
    else:
        n_text = (~visual).sum(1)
        width = int(n_text.max())
        valid = torch.arange(width, device=visual.device) < n_text.unsqueeze(1)
    return torch.argsort(visual.to(torch.int8), dim=1, stable=True)[:, :width], valid


def mask_positions(position_ids, cache, seq: int, device) -> torch.Tensor:
    """The 1-D positions the stock mask functions see: 2-D position ids as given, the text row of packed 3-D
    (M-RoPE) ones, or, as the stock text model makes them, the cache length onwards."""
    if position_ids is not None and position_ids.ndim == 3:
        position_ids = position_ids[0] if position_ids.shape[0] == 4 else None
    if position_ids is None:
        past = cache.get_seq_length() if cache is not None else 0
        position_ids = (torch.arange(seq, device=device) + past).unsqueeze(0)
    return position_ids


def text_query_masks(text_config, kinds, attention_mask, cache, position_ids, index, probe) -> dict:
    """Attention type -> the text queries' rows [B, 1, T, K] of the mask the stock text model builds for that type,
    additive (SDPA would turn a boolean mask into this in every layer). Built explicitly, because SDPA may otherwise
    get None ("is_causal"), which aligns a subset of queries wrongly. ``attention_mask``: the padding mask, or the
    stock model's own masks per type (a dict, e.g. Gemma 3's); ``position_ids``: None when the text model will make
    its own cache (an empty cache sizes the mask as no cache does, but with one, position ids are never read as
    packed sequences); ``probe``: an empty [B, S, 0] tensor, the shape and dtype the mask functions read."""
    batch, dtype = index.shape[0], probe.dtype
    masks = {}
    for kind in kinds:
        mask = attention_mask.get(kind) if isinstance(attention_mask, dict) else None
        if mask is None:
            padding = None if isinstance(attention_mask, dict) else attention_mask
            mask = MASK_FUNCTIONS[kind](
                text_config, probe, padding, cache, position_ids=position_ids, allow_is_causal_skip=False
            )
        mask = mask.expand(batch, -1, -1, -1)
        mask = mask.gather(2, index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))
        if mask.dtype == torch.bool:
            mask = _additive(mask, dtype)
        masks[kind] = mask
    return masks


def text_rows_inputs(language_model, layers, text_index, valid, masks, position_ids=None) -> FrozenRows:
    """The ``FrozenRows`` of the frozen ``layers`` from the text rows ``text_index`` [B, T], their ``valid`` flags
    [B, T] (or None) and their ``masks`` (attention type -> [B, 1, T, K]). With ``position_ids`` [B or 1, S] the text
    rows' cos/sin are computed here (as the text model computes them for all rows, gathered: the ONNX decoder);
    without, the first frozen layer of each attention type gathers them from the cos/sin the text model hands it."""
    hidden = language_model.config.hidden_size
    rows = FrozenRows(
        layers=frozenset(layers),
        index=text_index.unsqueeze(-1).expand(-1, -1, hidden),
        valid=None if valid is None else valid.unsqueeze(-1),
        masks=masks,
    )
    if position_ids is not None:  # one RoPE for every attention type (the families ONNX exports)
        dtype = language_model.embed_tokens.weight.dtype
        probe = torch.empty(text_index.shape[0], position_ids.shape[-1], 0, dtype=dtype, device=text_index.device)
        rope = language_model.rotary_emb(probe, position_ids)
        for kind in masks:
            rows.text_position_embeddings(kind, rope)
    return rows


def _count(features, hidden: int) -> int:
    """Feature vectors in an encoder output's ``pooler_output`` (a tensor, or a list of per-image tensors)."""
    if isinstance(features, torch.Tensor):
        return features.numel() // hidden
    return sum(f.numel() for f in features) // hidden


class ShortVModelMixin:
    """Over a family's stock model: the frozen layers, and the ``FrozenRows`` they share, built once per forward.

    A family's model class sets ``visual_token_keys`` (config fields of its visual placeholder tokens),
    ``pixel_keys`` (forward arguments that carry pixels) and ``encode(inputs)`` (the family's own encoder calls,
    as its stock ``forward`` makes them: modality -> encoder output). In a call with pixels (or encoder outputs)
    the images are encoded first, so the number of visual rows is known on the host, and the outputs are handed
    on to the stock forward as ``mm_encoder_outputs``; every other call is the stock forward, untouched.
    """

    visual_token_keys = ("image_token_id",)
    pixel_keys = ("pixel_values",)

    def __init__(self, config):
        super().__init__(config)
        self.shortv_layers = list(self.config.shortv_layers or [])
        text_model = self.shortv_text_model()
        layer_class = FROZEN_LAYERS.get(text_model.config.model_type)
        if self.shortv_layers and layer_class is None:
            raise ValueError(
                f"ShortV supports the text models {', '.join(FROZEN_LAYERS)}, not {text_model.config.model_type!r}"
            )
        self.shortv_prune = getattr(self.config, "shortv_prune", None)
        self._shortv_attention_types = attention_types(text_model.config)
        replaced = set(self.shortv_layers)
        if self.shortv_prune:  # FastV ranks in layer K-1; every layer from K on runs on the kept rows
            first = self.shortv_prune["layer"] - (self.shortv_prune["method"] == "fastv")
            replaced |= set(range(first, text_model.config.num_hidden_layers))
            types = self._shortv_attention_types
            sliding = [i for i in range(first, len(types)) if types[i] != "full_attention"]
            if layer_class is None or sliding:
                raise ValueError(
                    f"token pruning ({self.shortv_prune['method']}) supports the text models "
                    f"{', '.join(FROZEN_LAYERS)} with full attention from layer {first} on; layers {sliding} of "
                    f"this {text_model.config.model_type} attend in a sliding window"
                )
        for i in sorted(replaced):  # initialised as the stock layer it replaces was
            frozen = layer_class(text_model.config, i)
            frozen.load_state_dict(text_model.layers[i].state_dict())
            text_model.layers[i] = frozen
        if replaced:
            self._no_split_modules.add(layer_class.__name__)
        _warn_if_untested(self.config)

    def __init_subclass__(cls, **kwargs):
        """A family's model shows ``inspect.signature`` (which transformers' tests and tools read) the signature of
        the stock forward, which this mixin's ``forward`` hands every argument on to."""
        super().__init_subclass__(**kwargs)
        stock = getattr(super(), "forward", None)  # the stock forward; None in a mixin over no stock model yet
        if stock is not None and "forward" not in vars(cls):

            @functools.wraps(ShortVModelMixin.forward)
            def forward(self, input_ids=None, **kwargs):
                return ShortVModelMixin.forward(self, input_ids, **kwargs)

            forward.__signature__ = inspect.signature(stock)
            cls.forward = forward

    def shortv_text_model(self):
        """The decoder: ``language_model`` (LLaVA, Qwen2-VL) or ``text_model`` (Idefics3, SmolVLM)."""
        return self.language_model if "language_model" in self._modules else self.text_model

    def encode(self, inputs: dict) -> dict:
        """modality -> encoder output for the pixels in ``inputs`` (the forward's arguments), as the stock
        forward encodes them."""
        raise NotImplementedError

    def forward(self, input_ids=None, shortv_rank_positions=None, **kwargs):
        """The stock forward (keyword arguments after ``input_ids``, as ``generate`` passes them), with the frozen
        layers' ``FrozenRows`` as ``shortv`` and the token pruning as ``shortv_pruning`` in a call that carries
        images or videos, and the pruned layers' ``PrunedRows`` in the decode steps after it.
        ``shortv_rank_positions`` [B]: where each row's prompt ends, for FastV's ranking (default: its last
        non-padding position; ``generate`` passes the prompt's, so that it ranks alike with and without a cache)."""
        kwargs["input_ids"] = input_ids
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        encoded = dict(kwargs.get("mm_encoder_outputs") or {})
        has_pixels = any(kwargs.get(k) is not None and kwargs[k].shape[0] > 0 for k in self.pixel_keys)
        if (self.shortv_layers or self.shortv_prune) and (has_pixels or any(v is not None for v in encoded.values())):
            if has_pixels:  # encode here, as the stock forward would, to count the features
                for modality, output in self.encode(kwargs).items():
                    if encoded.get(modality) is None:
                        encoded[modality] = output
                kwargs.update(dict.fromkeys(self.pixel_keys), mm_encoder_outputs=encoded)
            hidden = self.shortv_text_model().config.hidden_size
            n_visual = sum(_count(out.pooler_output, hidden) for out in encoded.values() if out is not None)
            visual = self.visual_rows(kwargs)
            if self.shortv_prune:
                kwargs["shortv_pruning"] = self.token_pruning(kwargs, visual, n_visual, cache, shortv_rank_positions)
            kwargs["shortv"] = self.frozen_rows(kwargs, visual, n_visual)
        elif self.shortv_prune and getattr(cache, "shortv_kept", None) is not None:
            kwargs["shortv_pruning"] = self.decode_rows(kwargs, cache)
        out = super().forward(**kwargs)
        pruning = kwargs.get("shortv_pruning")
        if isinstance(pruning, TokenPruning):  # the decode steps read which prompt keys the pruned layers hold
            if cache is None:  # the one the text model made: ``cache`` from transformers 5.24, before
                cache = out.get("cache", out.get("past_key_values"))  # ``past_key_values``
            if cache is not None:
                cache.shortv_kept = pruning.rows.kept
        return out

    def visual_rows(self, inputs: dict) -> torch.Tensor:
        """[B, S] True on the visual rows of a call with ``inputs`` (the forward's arguments)."""
        token_ids = [
            getattr(self.config, k) for k in self.visual_token_keys if getattr(self.config, k, None) is not None
        ]
        return visual_rows(inputs.get("input_ids"), inputs.get("inputs_embeds"), self.get_input_embeddings(), token_ids)

    def token_pruning(self, inputs: dict, visual, n_visual: int, cache, rank_positions) -> TokenPruning:
        """The ``TokenPruning`` of a prefill with ``inputs``; ValueError where it cannot be exact."""
        text_model = self.shortv_text_model()
        if text_model.config._attn_implementation not in _MASKED_BACKENDS:
            raise ValueError(
                f"token pruning needs attention 'sdpa' or 'eager' (per-query masks), not "
                f"'{text_model.config._attn_implementation}'"
            )
        if cache is not None and (getattr(cache, "is_compileable", False) or cache.get_seq_length() > 0):
            raise ValueError(
                "token pruning removes visual tokens from the KV cache of the pruned layers: it needs an empty "
                "dynamic cache at the prefill (not a static cache, nor a prompt continued on a filled cache)"
            )
        padding = inputs.get("attention_mask")
        padding = None if padding is None or isinstance(padding, dict) else padding.bool()
        if rank_positions is None:
            rank_positions = last_positions(visual, padding)
        frozen = frozenset(i for i in self.shortv_layers if i >= self.shortv_prune["layer"])
        return TokenPruning(
            layer=self.shortv_prune["layer"],
            ratio=self.shortv_prune.get("ratio"),
            visual=visual,
            padding=padding,
            query=rank_positions.to(visual.device),
            n_visual=n_visual,
            frozen_layers=frozen,
            language_model=text_model,
        )

    def decode_rows(self, inputs: dict, cache) -> PrunedRows:
        reference = inputs.get("input_ids")
        if reference is None:
            reference = inputs["inputs_embeds"]
        padding = inputs.get("attention_mask")
        return decode_rows(
            self.shortv_prune["layer"],
            cache.shortv_kept,
            None if isinstance(padding, dict) else padding,
            cache.get_seq_length(),
            reference.shape[1],
            self.get_input_embeddings().weight.dtype,
        )

    def frozen_rows(self, inputs: dict, visual, n_visual: int) -> FrozenRows | DenseFrozenRows | None:
        """What the frozen layers before any pruned one share in a call with ``inputs`` (the forward's arguments),
        whose ``visual`` rows hold ``n_visual`` visual features."""
        layers = [i for i in self.shortv_layers if not self.shortv_prune or i < self.shortv_prune["layer"]]
        if not layers:
            return None
        embed = self.get_input_embeddings()
        text_model = self.shortv_text_model()
        if text_model.config._attn_implementation not in _MASKED_BACKENDS:
            logger.warning_once(
                f"ShortV: attention '{text_model.config._attn_implementation}' takes no per-query mask; frozen layers "
                "fall back to the dense layer with visual rows reset (exact, but no compute saved). Use 'sdpa' "
                "or 'eager' for the speed-up."
            )
            return DenseFrozenRows(frozenset(layers), visual)
        index, valid = text_index(visual, n_visual)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        positions = mask_positions(inputs.get("position_ids"), cache, visual.shape[1], visual.device)
        kinds = {self._shortv_attention_types[i] for i in layers}
        probe = torch.empty(*visual.shape, 0, dtype=embed.weight.dtype, device=visual.device)
        masks = text_query_masks(
            text_model.config,
            kinds,
            inputs.get("attention_mask"),
            cache,
            None if cache is None and self._makes_cache(inputs) else positions,
            index,
            probe,
        )
        return text_rows_inputs(text_model, layers, index, valid, masks)

    def _makes_cache(self, inputs: dict) -> bool:
        """Whether the stock forward's text model will make a cache: ``use_cache`` from the call, else the model's
        config, else the text model's (as the stock forwards default it)."""
        use_cache = inputs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", None)
        return bool(self.shortv_text_model().config.use_cache if use_cache is None else use_cache)


class ShortVForConditionalGenerationMixin:
    """Over a stock ``...ForConditionalGeneration``: its ``__init__``, with ``shortv_model_class`` (the family's
    ShortV model) in place of the stock model. (Every family's own PreTrainedModel keeps the transformers base's
    ``__init__``, so that is what runs first.)"""

    shortv_model_class: type

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.model = self.shortv_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def generate(self, inputs=None, *args, **kwargs):
        """The stock ``generate``; with FastV, each row's ranking token is the last one of its prompt in every step
        (so generating without a cache ranks as the prefill of a cached generation does)."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if (self.config.shortv_prune or {}).get("method") == "fastv" and prompt is not None:
            kwargs.setdefault("shortv_rank_positions", last_positions(prompt, kwargs.get("attention_mask")))
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args, shortv_rank_positions=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if shortv_rank_positions is not None:
            inputs["shortv_rank_positions"] = shortv_rank_positions
        return inputs

    def __init_subclass__(cls, **kwargs):
        """``generate`` reads which inputs the model takes from ``prepare_inputs_for_generation``'s signature:
        show it the stock one, with ``shortv_rank_positions`` added."""
        super().__init_subclass__(**kwargs)
        stock = getattr(super(), "prepare_inputs_for_generation", None)
        if stock is None or "prepare_inputs_for_generation" in vars(cls):
            return
        signature = inspect.signature(stock)
        params = list(signature.parameters.values())
        extra = inspect.Parameter("shortv_rank_positions", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        mine = ShortVForConditionalGenerationMixin.prepare_inputs_for_generation

        @functools.wraps(mine)
        def prepare_inputs_for_generation(self, *args, **kwargs):
            return mine(self, *args, **kwargs)

        prepare_inputs_for_generation.__signature__ = signature.replace(parameters=[*params[:at], extra, *params[at:]])
        cls.prepare_inputs_for_generation = prepare_inputs_for_generation


def last_positions(prompt: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """[B]: each row's last non-padding position of ``prompt`` (ids [B, S] or embeddings [B, S, D])."""
    batch, seq = prompt.shape[:2]
    if attention_mask is None:
        return torch.full((batch,), seq - 1, device=prompt.device)
    return (attention_mask.bool() * torch.arange(1, seq + 1, device=prompt.device)).argmax(1)


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
