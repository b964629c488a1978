"""Autoregressive code prior over raster order (the PixelSNAIL family of the paper), conditioned on text.

The sequence fed to the causal transformer is [BOS, c_0, ..., c_{L-2}] and position i predicts c_i
(BOS = token id V). Sampling runs L steps; with `SampleOptions.use_cache` each step feeds one token and
reuses the per-layer self-attention keys/values (KVCache) and the text keys/values computed once; without it
every step recomputes everything on the whole prefix (the reference the cache must
reproduce exactly, and the baseline of the benchmark).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medunifier.generate.prior_base import BaseCodePrior, DecodeRun
from medunifier.generate.prior_common import KVCache, PriorConfig


class AutoregressiveCodePrior(BaseCodePrior):
    """p(codes | text[, context codes]) = prod_i p(c_i | c_<i, text[, context]) for one level.

    side: side of this level's map; context_side: side of the conditioning (top) map, or None.
    """

    def __init__(self, config: PriorConfig, side: int, context_side: int | None = None) -> None:
        super().__init__(config, side, context_side)
        self.bos_id = config.codebook_size

    def _shift_right(self, codes: Tensor) -> Tensor:
        """[B, L] -> [B, L]: BOS then all codes but the last."""
        bos = codes.new_full((codes.shape[0], 1), self.bos_id)
        return torch.cat([bos, codes[:, :-1]], dim=1)

    def _loss(self, target: Tensor, text_states: Tensor, text_mask: Tensor, context: Tensor | None) -> Tensor:
        """Next-code cross-entropy (see `BaseCodePrior.loss`)."""
        logits = self._train_logits(self._shift_right(target), text_states, text_mask, context, causal=True)
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())  # logits [B, L, V]

    def _decode(self, run: DecodeRun) -> Tensor:
        """L steps in raster order (see `BaseCodePrior._decode`); a kept position's code is forced."""
        if run.options.confidence_noise > 0:
            raise ValueError("confidence_noise is an option of the masked prior; leave it at 0 for the "
                             "autoregressive one")
        use_cache, cond = run.options.use_cache, run.cond
        codes = run.tokens.clone()
        cache = KVCache(len(self.net.blocks), self.seq_len) if use_cache else None
        text_kv = self.net.text_kv(cond.states) if use_cache else None
        bos = codes.new_full((codes.shape[0], 1), self.bos_id)
        for i in range(self.seq_len):
            if use_cache:
                # One new position: the previous code (BOS at i = 0), reusing cached keys/values.
                prev = codes[:, i - 1 : i] if i > 0 else bos
                logits = self.net(
                    prev.repeat(cond.repeats, 1),
                    text_kv,
                    cond.mask,
                    run.context,
                    causal=True,
                    start=i,
                    cache=cache,
                )[:, -1]
            else:
                # Full recomputation on [BOS, c_0, ..., c_{i-1}], text keys/values included.
                prefix = self._shift_right(codes[:, : i + 1])
                logits = self.net(
                    prefix.repeat(cond.repeats, 1),
                    self.net.text_kv(cond.states),
                    cond.mask,
                    run.context,
                    causal=True,
                )[:, -1]
            token, _ = run.draw(logits)  # [B]
            codes[:, i] = torch.where(run.resample[:, i], token, codes[:, i])
            run.report(i, codes)
        return codes
