"""Masked, parallel-decoding code prior (MaskGIT, Chang et al. 2022), conditioned on report text.

Training: per sample draw r ~ U(0, 1), mask ceil(cos(pi/2 r) * L) random positions (token id V = [MASK]),
predict them with a bidirectional transformer; cross-entropy on the masked positions only.

Sampling in S steps: all positions to generate start as [MASK]; at step s the model predicts every masked
position, a token is drawn for each (temperature, top-k/top-p), and the most confident ones are kept so that
exactly floor(N * cos(pi/2 * s/S)) stay masked; the rest are re-masked. Kept tokens never change.
Counterfactual editing: start from `init_codes` with only `edit_mask` positions masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medunifier.generate.prior_base import BaseCodePrior, DecodeRun
from medunifier.generate.prior_common import (
    PriorConfig,
    cosine_schedule,
    gumbel_noise,
    masked_count_schedule,
)


class MaskedCodePrior(BaseCodePrior):
    """p(codes | text[, context codes]) for one level of the code hierarchy, decoded in parallel.

    side: side of this level's map; context_side: side of the conditioning map (the top level, for the
    bottom prior) or None.
    """

    def __init__(self, config: PriorConfig, side: int, context_side: int | None = None) -> None:
        super().__init__(config, side, context_side)
        self.mask_id = config.codebook_size

    def _loss(self, target: Tensor, text_states: Tensor, text_mask: Tensor, context: Tensor | None) -> Tensor:
        """Masked-token cross-entropy (see `BaseCodePrior.loss`)."""
        batch = target.shape[0]
        # Masked fraction gamma(r), r ~ U(0, 1); at least one masked position per sample.
        r = torch.rand(batch, device=target.device)
        fraction = cosine_schedule(r).to(target.device)
        num_masked = torch.ceil(fraction * self.seq_len).long().clamp(1, self.seq_len)  # [B]
        noise = torch.rand(batch, self.seq_len, device=target.device)
        rank = noise.argsort(1).argsort(1)  # a random permutation of the positions, per sample
        masked = rank < num_masked[:, None]  # [B, L]
        tokens = target.masked_fill(masked, self.mask_id)
        logits = self._train_logits(tokens, text_states, text_mask, context, causal=False)
        return F.cross_entropy(logits[masked].float(), target[masked])

    def _decode(self, run: DecodeRun) -> Tensor:
        """`options.steps` parallel steps over the positions to re-sample (see `BaseCodePrior._decode`)."""
        steps = run.options.steps or self.config.steps
        noise, cond, tokens, masked = run.options.confidence_noise, run.cond, run.tokens, run.resample
        counts = masked_count_schedule(masked.sum(1), steps)  # [B, S] still masked after each step
        text_kv = self.net.text_kv(cond.states)
        for s in range(steps):
            logits = self.net(tokens.repeat(cond.repeats, 1), text_kv, cond.mask, run.context, causal=False)
            sampled, confidence = run.draw(logits)  # [B, L] each; the confidence is the log-prob
            if noise > 0:
                anneal = noise * (1.0 - (s + 1) / steps)
                confidence = confidence + anneal * gumbel_noise(confidence.shape, run.generator, tokens.device)
            confidence = confidence.masked_fill(~masked, float("inf"))  # fixed tokens are never re-masked
            candidate = torch.where(masked, sampled, tokens)
            rank = confidence.argsort(1).argsort(1)  # 0 = least confident
            masked = rank < counts[:, s : s + 1].to(tokens.device)  # only ever a subset of the previous mask
            tokens = candidate.masked_fill(masked, self.mask_id)
            run.report(s, tokens)
        return tokens
