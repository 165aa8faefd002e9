"""ShortV for LLaVA and LLaVA-NeXT (Yuan et al., 2025, arXiv 2504.00502).

In the decoder layers listed in ``config.shortv_layers`` visual tokens are *frozen* during prefill: keys and
values are still computed for every position (and cached), but only text positions are queries and go
through ``o_proj`` and the MLP; visual positions leave the layer with the hidden state they entered with.
Because attention is causal and K/V come from the layer input, text outputs equal those of the dense layer.
Visual positions are the ones whose ``input_ids`` equal ``config.image_token_id``. Decode steps (text only)
and layers not listed run the stock code. With ``shortv_layers=[]`` the model is stock LLaVA.
"""

from functools import cache

import torch
from torch import nn
from transformers import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
)
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel
from transformers.utils import logging

from .configuration_shortv_llava import ShortVLlavaConfig, ShortVLlavaNextConfig

logger = logging.get_logger(__name__)

# Attention backends that take the explicit [batch, 1, queries, keys] mask a frozen layer needs.
_MASKED_BACKENDS = ("eager", "sdpa")


class ShortVDecoderLayer:
    """Mixin over a stock decoder layer (Llama, Mistral, Qwen2): the frozen, text-only branch.

    Frozen layers receive ``shortv`` from the model: ``text_index`` [B, T] (each row's text positions first,
    padded with visual positions), ``text_valid`` [B, T] (False on that padding, or None when no row is
    padded) and ``attention_mask`` [B, 1, T, K] (the causal/padding mask rows of those queries); or, for
    attention backends that take no such mask, only ``visual`` [B, S].
    """

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        position_embeddings=None,
        shortv=None,
        **kwargs,
    ):
        if shortv is None or "visual" in shortv:  # dense layer (and, as a fallback, visual rows reset)
            out = super().forward(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            if shortv is None:
                return out
            return torch.where(shortv["visual"].to(out.device).unsqueeze(-1), hidden_states, out)
        device = hidden_states.device
        index = shortv["text_index"].to(device)
        valid = shortv["text_valid"].to(device) if shortv["text_valid"] is not None else None
        mask = shortv["attention_mask"].to(device)
        attn = self.self_attn
        batch, seq, _ = hidden_states.shape
        n_text = index.shape[1]

        def text_rows(x):  # [B, S, D] -> [B, T, D]
            return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        residual = text_rows(hidden_states)
        normed = self.input_layernorm(hidden_states)
        cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
        key = attn.k_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        value = attn.v_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        key = key * cos.unsqueeze(1) + rotate_half(key) * sin.unsqueeze(1)
        query = attn.q_proj(text_rows(normed)).view(batch, n_text, -1, attn.head_dim).transpose(1, 2)
        query = query * text_rows(cos).unsqueeze(1) + rotate_half(query) * text_rows(sin).unsqueeze(1)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, attn.layer_idx)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        out, _ = attention(
            attn,
            query,
            key,
            value,
            mask,
            dropout=0.0,
            scaling=attn.scaling,
            sliding_window=getattr(attn, "sliding_window", None),
            **kwargs,
        )
        text = residual + attn.o_proj(out.reshape(batch, n_text, -1))
        text = text + self.mlp(self.post_attention_layernorm(text))
        if valid is not None:  # padding entries point at visual rows: write those back unchanged
            text = torch.where(valid.unsqueeze(-1), text, residual)
        return hidden_states.scatter(1, index.unsqueeze(-1).expand(-1, -1, text.shape[-1]), text)


@cache
def _frozen_layer_class(base: type) -> type:
    return type(f"ShortV{base.__name__}", (ShortVDecoderLayer, base), {})


class ShortVModelMixin:
    """Plumbing shared by the LLaVA and LLaVA-NeXT models: mark the frozen layers, find the visual rows."""

    def _shortv_init(self):
        self.shortv_layers = list(self.config.shortv_layers or [])
        for i in self.shortv_layers:
            layer = self.language_model.layers[i]
            layer.__class__ = _frozen_layer_class(type(layer))  # same parameters, frozen forward
            self._no_split_modules.add(type(layer).__name__)

    def _shortv_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values):
        """The ``shortv`` argument for frozen layers, or None when nothing in this call is visual."""
        if not self.shortv_layers:
            return None
        embed = self.get_input_embeddings()
        if input_ids is not None:
            visual = input_ids == self.config.image_token_id
        else:  # visual rows still hold the image token's embedding here
            token = torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            visual = (inputs_embeds == embed(token)).all(-1)
        if not visual.any():
            return None
        text_config = self.config.text_config
        if text_config._attn_implementation not in _MASKED_BACKENDS:
            logger.warning_once(
                f"ShortV: attention '{text_config._attn_implementation}' takes no per-query mask; frozen layers "
                "fall back to the dense layer with visual rows reset (exact, but no compute saved). Use 'sdpa' "
                "or 'eager' for the speed-up."
            )
            return {"visual": visual}

        batch, seq = visual.shape
        n_text = (~visual).sum(1)
        width = int(n_text.max())
        # Text positions of each row first, in order, then its visual positions (stable sort).
        text_index = torch.argsort(visual.to(torch.int8), dim=1, stable=True)[:, :width]
        text_valid = torch.arange(width, device=visual.device) < n_text.unsqueeze(1)
        # SDPA may otherwise get None ("is_causal"), which aligns a subset of queries wrongly.
        dtype = embed.weight.dtype
        probe = torch.empty(batch, seq, 0, dtype=dtype, device=visual.device)
        mask = create_causal_mask(
            config=text_config,
            inputs_embeds=probe,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
            allow_is_causal_skip=False,
        )
        mask = mask.expand(batch, -1, -1, -1)
        mask = mask.gather(2, text_index[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))
        return {
            "text_index": text_index,
            "attention_mask": mask,
            "text_valid": None if bool(text_valid.all()) else text_valid,
        }

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        **kwargs,
    ):
        shortv = self._shortv_inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values)
        if shortv is not None:
            kwargs["shortv"] = shortv
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
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
