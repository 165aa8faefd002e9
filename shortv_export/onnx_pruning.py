"""FastV / VTW in the ONNX decoder: the model file's ``TokenPruning`` as one graph runs it, for the prefill and for
every decode step.

The graph ranks (FastV) exactly as the model file does (its ``attention_weights`` and ``keep``; the stable sort as
ONNX ``TopK``), then lays the kept rows out as the model file's ``text_index(~keep)`` does: the kept rows first,
in their original order, each row padded with removed positions up to the widest row's count, so that every
present holds what PyTorch's cache holds. That count is the one size the graph cannot know from its inputs'
shapes (torch.export traces no data-dependent size through transformers' attention), so the runner passes it as
the width of ``kept_valid``. The pruned layers' mask also covers the keys they cached in earlier calls
(``pruned_past_mask``), so a decode step (one text token, kept) runs the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .modeling.modeling_shortv import PrunedRows, TokenPruning, _additive, seen_among, text_rows_inputs


@dataclass
class GraphPruning(TokenPruning):
    """``TokenPruning`` in the decoder graph. ``kept_valid`` [B, A]: True on each row's first T_b + k_b slots, its
    text rows and the k_b image tokens it keeps, padded to the widest row (its width sizes the pruned layers' rows:
    the runner computes the counts, the graph which tokens); ``past_ok`` [B, P]: which keys the pruned layers hold
    from earlier calls may be attended to; ``positions``: the new rows' position ids ([B, S], or [3, B, S] for
    M-RoPE); ``text``: ``text_index``. After ``pruned_rows``, ``ok`` [B, A] marks which kept rows later queries may
    attend to (the graph's ``pruned_mask`` output, after ``past_ok``)."""

    kept_valid: torch.Tensor | None = None
    past_ok: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    text: torch.Tensor | None = None
    ok: torch.Tensor | None = None

    def order(self, scores: torch.Tensor) -> torch.Tensor:
        """By ``TopK`` over every position, which puts ties at the lower index as the model file's stable sort does
        (ONNX has no stable sort)."""
        return scores.topk(scores.shape[1], dim=1).indices

    def pruned_rows(self, keep: torch.Tensor, n_kept: int | None = None) -> PrunedRows:
        # Slot j of a row: its (j+1)-th kept row, or past its count the (j - count + 1)-th removed one (the model
        # file's text_index(~keep) layout), each found by counting (no sort, no size read from the data).
        valid = self.kept_valid
        width = valid.shape[1]
        slots = torch.arange(width, device=keep.device)
        count = keep.sum(1, keepdim=True)
        kept_at = (keep.long().cumsum(1)[:, None, :] <= slots[None, :, None]).sum(-1)
        removed_at = ((~keep).long().cumsum(1)[:, None, :] <= (slots - count)[:, :, None]).sum(-1)
        index = torch.where(slots < count, kept_at, removed_at)
        self.ok = valid & self.padding.gather(1, index)
        seen = torch.cat([self.past_ok[:, None, :].expand(-1, width, -1), seen_among(self.ok)], dim=-1)
        mask = _additive(seen[:, None], self.language_model.embed_tokens.weight.dtype)
        frozen = None
        if self.frozen_layers and self.ratio is not None:  # VTW keeps text rows only: there frozen = stock
            # each text row's slot: the kept rows before it (a row's repeated last text position: the same slot)
            text = ((index[:, None, :] < self.text[:, :, None]) & valid[:, None, :]).sum(-1)
            masks = {"full_attention": mask.gather(2, text[:, None, :, None].expand(-1, 1, -1, mask.shape[-1]))}
            positions = self.positions
            if positions.ndim == 3:  # M-RoPE: the kept rows' (temporal, height, width) positions
                kept_positions = positions.gather(2, index.unsqueeze(0).expand(positions.shape[0], -1, -1))
            else:
                kept_positions = positions.gather(1, index)
            frozen = text_rows_inputs(self.language_model, self.frozen_layers, text, None, masks, kept_positions)
        hidden = self.language_model.config.hidden_size
        return PrunedRows(
            layer=self.layer,
            mask=mask,
            index=index.unsqueeze(-1).expand(-1, -1, hidden),
            valid=valid.unsqueeze(-1),
            frozen=frozen,
        )
