"""Masked, parallel-decoding code prior (MaskGIT, Chang et al. 2022), conditioned on report text.

Training: per sample draw r ~ U(0, 1), mask ceil(cos(pi/2 r) * L) random positions (token id V = [MASK]),
predict them with a bidirectional transformer; cross-entropy on the masked positions only.

Sampling in S steps: all positions to generate start as [MASK]; at step s the model predicts every masked
position, a token is drawn for each (temperature, top-k/top-p), and the most confident ones are kept so that
exactly floor(N * cos(pi/2 * s/S)) stay masked; the rest are re-masked. Kept tokens never change.
Counterfactual editing: start from `init_codes` with only `edit_mask` positions masked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medunifier.generate.prior_common import (
    PriorConfig,
    PriorTransformer,
    TextConditioner,
    batch_size_of,
    check_codes,
    cosine_schedule,
    gumbel_noise,
    make_conditioning,
    masked_count_schedule,
    sample_tokens,
)


class MaskedCodePrior(nn.Module):
    """p(codes | text[, context codes]) for one level of the code hierarchy, decoded in parallel.

    side: side of this level's map; context_side: side of the conditioning map (the top level, for the
    bottom prior) or None.
    """

    def __init__(self, config: PriorConfig, side: int, context_side: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.side = side
        self.seq_len = side * side
        self.mask_id = config.codebook_size
        self.conditioner = TextConditioner(config.text_width)
        self.net = PriorTransformer(config, side, context_side)

    def loss(
        self,
        codes: Tensor,
        text_states: Tensor,
        text_mask: Tensor,
        context_codes: Tensor | None = None,
    ) -> Tensor:
        """Masked-token cross-entropy. codes [B, h, w] long, text_states [B, T, H], text_mask [B, T]."""
        check_codes(codes, self.side, "codes")
        batch = codes.shape[0]
        target = codes.flatten(1)  # [B, L]
        # Masked fraction gamma(r), r ~ U(0, 1); at least one masked position per sample.
        r = torch.rand(batch, device=codes.device)
        fraction = cosine_schedule(r).to(codes.device)
        num_masked = torch.ceil(fraction * self.seq_len).long().clamp(1, self.seq_len)  # [B]
        noise = torch.rand(batch, self.seq_len, device=codes.device)
        rank = noise.argsort(1).argsort(1)  # a random permutation of the positions, per sample
        masked = rank < num_masked[:, None]  # [B, L]
        tokens = target.masked_fill(masked, self.mask_id)

        drop_p = self.config.cond_dropout if self.training else 0.0
        states, mask = self.conditioner.drop(text_states, text_mask, drop_p)
        logits = self.net(
            tokens, self.net.text_kv(states), mask, self.net.context(context_codes), causal=False
        )
        return F.cross_entropy(logits[masked].float(), target[masked])

    @torch.no_grad()
    def sample(
        self,
        text_states: Tensor | None,
        text_mask: Tensor | None = None,
        *,
        num_samples: int | None = None,
        guidance: float = 1.0,
        steps: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        context_codes: Tensor | None = None,
        init_codes: Tensor | None = None,
        edit_mask: Tensor | None = None,
        confidence_noise: float = 0.0,
        use_cache: bool = True,
        on_step: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Sample a code map [B, h, w].

        text_states None -> unconditional (num_samples rows). guidance g: logits = uncond + g (cond - uncond).
        steps: parallel-decoding steps (config.steps if None). edit_mask (bool [B, h, w], True = re-sample)
        with init_codes: only those positions are generated, the others are kept. confidence_noise: MaskGIT's
        annealed Gumbel noise on the confidences (their "choice temperature"; 0 = pure confidence).
        use_cache: unused (the text keys/values are always computed once per call). on_step(s, tokens [B, L])
        is called after every step with the current tokens ([MASK] = codebook_size). Call in eval mode.
        """
        del use_cache
        steps = steps or self.config.steps
        batch = batch_size_of(text_states, init_codes, context_codes, num_samples)
        device = self.net.pos_embed.device
        if init_codes is not None:
            check_codes(init_codes, self.side, "init_codes")
            tokens = init_codes.flatten(1).clone().to(device)
            masked = (
                torch.ones_like(tokens, dtype=torch.bool)
                if edit_mask is None
                else edit_mask.to(device).flatten(1).bool().clone()
            )
        else:
            tokens = torch.full((batch, self.seq_len), self.mask_id, dtype=torch.long, device=device)
            masked = torch.ones_like(tokens, dtype=torch.bool)
        tokens = tokens.masked_fill(masked, self.mask_id)
        counts = masked_count_schedule(masked.sum(1), steps)  # [B, S] still masked after each step

        cond = make_conditioning(self.conditioner, text_states, text_mask, guidance, batch)
        text_kv = self.net.text_kv(cond.states)
        context = cond.rows(self.net.context(context_codes))

        for s in range(steps):
            logits = self.net(tokens.repeat(cond.repeats, 1), text_kv, cond.mask, context, causal=False)
            logits = cond.merge(logits)  # [B, L, V]
            sampled, log_probs = sample_tokens(logits, temperature, top_k, top_p, generator)
            confidence = log_probs
            if confidence_noise > 0:
                anneal = confidence_noise * (1.0 - (s + 1) / steps)
                confidence = confidence + anneal * gumbel_noise(confidence.shape, generator, device)
            confidence = confidence.masked_fill(~masked, float("inf"))  # fixed tokens are never re-masked
            candidate = torch.where(masked, sampled, tokens)
            rank = confidence.argsort(1).argsort(1)  # 0 = least confident
            masked = rank < counts[:, s : s + 1].to(device)  # only ever a subset of the previous mask
            tokens = candidate.masked_fill(masked, self.mask_id)
            if on_step is not None:
                on_step(s, tokens)
        return tokens.view(batch, self.side, self.side)
