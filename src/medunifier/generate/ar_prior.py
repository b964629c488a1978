"""Autoregressive code prior over raster order (the PixelSNAIL family of the paper), conditioned on text.

The sequence fed to the causal transformer is [BOS, c_0, ..., c_{L-2}] and position i predicts c_i
(BOS = token id V). Sampling runs L steps; with `use_cache=True` each step feeds one token and reuses the
per-layer self-attention keys/values (KVCache) and the text keys/values computed once; with
`use_cache=False` every step recomputes everything on the whole prefix (the reference the cache must
reproduce exactly, and the baseline of the benchmark).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medunifier.generate.prior_common import (
    KVCache,
    PriorConfig,
    PriorTransformer,
    TextConditioner,
    batch_size_of,
    check_codes,
    make_conditioning,
    sample_tokens,
)


class AutoregressiveCodePrior(nn.Module):
    """p(codes | text[, context codes]) = prod_i p(c_i | c_<i, text[, context]) for one level.

    side: side of this level's map; context_side: side of the conditioning (top) map, or None.
    """

    def __init__(self, config: PriorConfig, side: int, context_side: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.side = side
        self.seq_len = side * side
        self.bos_id = config.codebook_size
        self.conditioner = TextConditioner(config.text_width)
        self.net = PriorTransformer(config, side, context_side)

    def _shift_right(self, codes: Tensor) -> Tensor:
        """[B, L] -> [B, L]: BOS then all codes but the last."""
        bos = codes.new_full((codes.shape[0], 1), self.bos_id)
        return torch.cat([bos, codes[:, :-1]], dim=1)

    def loss(
        self,
        codes: Tensor,
        text_states: Tensor,
        text_mask: Tensor,
        context_codes: Tensor | None = None,
    ) -> Tensor:
        """Next-code cross-entropy. codes [B, h, w] long, text_states [B, T, H], text_mask [B, T]."""
        check_codes(codes, self.side, "codes")
        target = codes.flatten(1)  # [B, L]
        drop_p = self.config.cond_dropout if self.training else 0.0
        states, mask = self.conditioner.drop(text_states, text_mask, drop_p)
        logits = self.net(
            self._shift_right(target),
            self.net.text_kv(states),
            mask,
            self.net.context(context_codes),
            causal=True,
        )  # [B, L, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())

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
        use_cache: bool = True,
    ) -> Tensor:
        """Sample a code map [B, h, w] in raster order.

        text_states None -> unconditional (num_samples rows). guidance g: logits = uncond + g (cond - uncond).
        steps: unused (always L steps). With init_codes and edit_mask (bool [B, h, w], True = re-sample) the
        positions outside the mask are forced to init_codes; a re-sampled position only sees the codes before
        it in raster order (the masked prior is the natural editor). Call in eval mode.
        """
        del steps
        batch = batch_size_of(text_states, init_codes, context_codes, num_samples)
        device = self.net.pos_embed.device
        keep = None
        if init_codes is not None:
            check_codes(init_codes, self.side, "init_codes")
            init = init_codes.to(device).flatten(1)
            resample = (
                torch.ones_like(init, dtype=torch.bool)
                if edit_mask is None
                else edit_mask.to(device).flatten(1)
            )
            keep = ~resample.bool()  # [B, L]

        cond = make_conditioning(self.conditioner, text_states, text_mask, guidance, batch)
        context = cond.rows(self.net.context(context_codes))  # [repeats*B, L, W] or None
        cache = KVCache(len(self.net.blocks), self.seq_len) if use_cache else None
        text_kv = self.net.text_kv(cond.states) if use_cache else None

        codes = torch.full((batch, self.seq_len), self.bos_id, dtype=torch.long, device=device)
        for i in range(self.seq_len):
            if use_cache:
                # One new position: the previous code (BOS at i = 0), reusing cached keys/values.
                prev = codes[:, i - 1 : i] if i > 0 else codes[:, :1]  # codes[:, 0] still holds BOS at i = 0
                logits = self.net(
                    prev.repeat(cond.repeats, 1),
                    text_kv,
                    cond.mask,
                    context,
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
                    context,
                    causal=True,
                )[:, -1]
            token, _ = sample_tokens(cond.merge(logits), temperature, top_k, top_p, generator)  # [B]
            if keep is not None:
                token = torch.where(keep[:, i], init[:, i], token)
            codes[:, i] = token
        return codes.view(batch, self.side, self.side)
