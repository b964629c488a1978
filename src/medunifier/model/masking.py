"""The encoder's attention layout: which positions may attend to which in each mode, and the KV cache of
incremental decoding. Queries come first, then text; the mode decides who sees whom:

    mode            positions        who attends to what                              used by
    "text"          text             bidirectional over text                          ITC text side
    "query"         queries          bidirectional over queries                       ITC image side, TIG f_q
    "bidirectional" queries + text   everything sees everything                       ITM
    "causal"        queries + text   queries see queries; text t sees queries + text<=t ITG (report generation)
    "prefix"        queries + text   as causal, but text with index < prefix_lengths[b] VQA
                                     (the question) sees the whole question

Padding (attention_mask == 0) is always masked as a key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CACHED_MODES", "MODES", "KVCache", "build_attention_mask"]

MODES = ("text", "query", "bidirectional", "causal", "prefix")
CACHED_MODES = ("causal", "prefix")  # the modes a KV cache can continue


@dataclass
class KVCache:
    """Self-attention keys/values of everything processed so far, for incremental decoding.

    keys/values: one [B, heads, P, head_dim] tensor per layer, P = num_queries + text columns.
    key_mask:    [B, P] bool, False for padding keys.
    text_lengths:[B] long, number of valid text tokens so far (the next text position id).
    num_queries: query positions at the front of the cache (0 when decoding without an image).
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_mask: Tensor
    text_lengths: Tensor
    num_queries: int

    def length(self) -> int:
        """P: cached positions (queries + text columns)."""
        return self.key_mask.shape[1]

    @property
    def num_text(self) -> int:
        return self.length() - self.num_queries

    def reorder(self, index: Tensor) -> KVCache:
        """Select batch rows (beam search: keep the surviving beams), in place; returns self."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.key_mask = self.key_mask.index_select(0, index)
        self.text_lengths = self.text_lengths.index_select(0, index)
        return self

    def repeat_interleave(self, n: int) -> KVCache:
        """Expand each batch row to n consecutive rows (a batch -> its beams), in place; returns self."""
        self.keys = [k.repeat_interleave(n, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(n, dim=0) for v in self.values]
        self.key_mask = self.key_mask.repeat_interleave(n, dim=0)
        self.text_lengths = self.text_lengths.repeat_interleave(n, dim=0)
        return self


def build_attention_mask(
    mode: str,
    num_queries: int,
    text_valid: Tensor,
    past_key_mask: Tensor | None = None,
    past_num_queries: int = 0,
    prefix_lengths: Tensor | None = None,
) -> Tensor | None:
    """Boolean self-attention mask [B, 1, S, P + S] (True = may attend), or None when nothing is masked.

    Rows are the S = num_queries + T new positions (queries first); columns are the P cached keys
    (past_num_queries queries, then past text) followed by the new positions. `text_valid` [B, T] marks
    non-padding text. Every row may attend to itself so that no row is empty (only padding rows,
    whose outputs are ignored, can be affected by this).
    """
    batch, num_text = text_valid.shape
    device = text_valid.device
    past_len = 0 if past_key_mask is None else past_key_mask.shape[1]
    past_text = past_len - past_num_queries
    rows = num_queries + num_text
    key_valid = torch.cat(
        [
            past_key_mask if past_key_mask is not None else text_valid.new_ones(batch, 0),
            text_valid.new_ones(batch, num_queries),
            text_valid,
        ],
        dim=1,
    )  # [B, K]
    if mode in ("text", "query", "bidirectional"):
        # no text and no cache: nothing to mask, known from the shapes without a host-device sync
        if (num_text == 0 and past_key_mask is None) or bool(key_valid.all()):
            return None
        allowed = key_valid[:, None, :].expand(batch, rows, -1)
    else:
        # column/row kinds: query or text with its absolute text index
        key_is_query = torch.cat(
            [
                torch.arange(past_len, device=device) < past_num_queries,
                torch.ones(num_queries, dtype=torch.bool, device=device),
                torch.zeros(num_text, dtype=torch.bool, device=device),
            ]
        )  # [K]
        key_text_index = torch.cat(
            [
                torch.arange(past_len, device=device) - past_num_queries,
                torch.full((num_queries,), -1, device=device),
                past_text + torch.arange(num_text, device=device),
            ]
        )  # [K]
        row_is_query = torch.arange(rows, device=device) < num_queries  # [S]
        row_text_index = torch.arange(rows, device=device) - num_queries + past_text  # [S]
        text_sees = key_text_index[None, :] <= row_text_index[:, None]  # [S, K] causal
        text_sees = text_sees[None].expand(batch, -1, -1)
        if mode == "prefix":
            if prefix_lengths is None:
                raise ValueError("mode='prefix' needs prefix_lengths (question length per sample)")
            p = prefix_lengths.to(device).view(batch, 1, 1)
            in_prefix_row = row_text_index.view(1, rows, 1) < p
            in_prefix_key = key_text_index.view(1, 1, -1) < p
            text_sees = text_sees | (in_prefix_row & in_prefix_key)
        # queries see queries only; text sees all queries and the text allowed above
        allowed = torch.where(
            row_is_query[None, :, None],
            key_is_query[None, None, :].expand(batch, rows, -1),
            key_is_query[None, None, :] | text_sees,
        )
        allowed = allowed & key_valid[:, None, :]
    self_index = past_len + torch.arange(rows, device=device)
    allowed = allowed.clone()
    allowed[:, torch.arange(rows, device=device), self_index] = True
    return allowed[:, None]  # [B, 1, S, K]

