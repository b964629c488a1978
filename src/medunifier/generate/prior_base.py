"""The frame both code priors share: `SampleOptions` (how to draw), `DecodeRun` (what a decoder gets) and
`BaseCodePrior` (the text conditioner, the transformer and `sample`, which sets up a run for the subclass's
decoder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medunifier.generate.prior_common import (
    Conditioning,
    PriorConfig,
    PriorTransformer,
    TextConditioner,
    batch_size_of,
    check_codes,
    make_conditioning,
    sample_tokens,
)
from medunifier.utils import check_fields

__all__ = ["BaseCodePrior", "DecodeRun", "SampleOptions"]


@dataclass(frozen=True)
class SampleOptions:
    """How a code prior draws its codes (as transformers' GenerationConfig): checked once, then passed to both
    levels. Each option a prior family does not use is ignored, but for `confidence_noise` (see below).

    Args:
        guidance: classifier-free guidance g >= 0: logits = uncond + g (cond - uncond); 0 samples without the
            text, 1 with the text alone.
        temperature: softmax temperature >= 0; 0 is greedy (the most likely code, no random draw).
        top_k: draw only among the k >= 1 most likely codes, or None for all of them.
        top_p: draw only within the nucleus of probability mass top_p in (0, 1], or None for all codes.
        steps: masked prior: parallel-decoding steps per level, >= 1 (None = `PriorConfig.steps`); the
            autoregressive prior always takes one step a position.
        confidence_noise: masked prior: MaskGIT's annealed Gumbel noise on the confidences (their "choice
            temperature"), >= 0; 0 = pure confidence. The autoregressive prior refuses a positive one.
        use_cache: autoregressive prior: reuse the self-attention keys/values (False recomputes the whole prefix
            at every step, the reference the cache must reproduce). The masked prior always computes the text
            keys/values once per call.
    """

    guidance: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    steps: int | None = None
    confidence_noise: float = 0.0
    use_cache: bool = True

    def __post_init__(self) -> None:
        check_fields(self, (
            ("guidance", self.guidance >= 0, ">= 0 (1 = the text alone, 0 = no text)"),
            ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k is None or self.top_k >= 1, ">= 1, or None for no top-k filter"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "in (0, 1], or None for no nucleus filter"),
            ("steps", self.steps is None or self.steps >= 1, ">= 1, or None for the prior's default"),
            ("confidence_noise", self.confidence_noise >= 0, ">= 0 (0 = pure confidence)"),
        ))


@dataclass
class DecodeRun:
    """What `BaseCodePrior.sample` hands a prior's decoder: the start, the text rows and how to draw."""

    tokens: Tensor  # [B, L]: the kept codes, V at the positions to generate
    resample: Tensor  # bool [B, L]: True at the positions to generate
    cond: Conditioning  # the sampling-time text rows and guidance
    context: Tensor | None  # the context-code embeddings for the network's rows, or None
    options: SampleOptions
    generator: torch.Generator | None
    on_step: Callable[[int, Tensor], None] | None

    def draw(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The network's logits [repeats*B, ..., V] -> guided, one token drawn per row: (tokens, log-prob)."""
        o = self.options
        return sample_tokens(self.cond.merge(logits), o.temperature, o.top_k, o.top_p, self.generator)

    def report(self, step: int, tokens: Tensor) -> None:
        """Hand on_step (if any) a copy of the tokens [B, L] after a decoding step."""
        if self.on_step is not None:
            self.on_step(step, tokens.clone())


class BaseCodePrior(nn.Module):
    """What both code priors share: the text conditioner, the transformer and `sample`'s set-up.

    A subclass computes the loss in `_loss` and decodes in `_decode`. Id V = codebook_size marks a position not decided
    yet at sampling time (the masked prior's [MASK]; the autoregressive prior's BOS, never sampled).

    Args:
        config: the prior's sizes.
        side: side of this level's map.
        context_side: side of the conditioning map (the top level, for the bottom prior), or None.
    """

    def __init__(self, config: PriorConfig, side: int, context_side: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.side = side
        self.seq_len = side * side
        self.conditioner = TextConditioner(config.text_width)
        self.net = PriorTransformer(config, side, context_side)

    def loss(
        self,
        codes: Tensor,
        text_states: Tensor,
        text_mask: Tensor,
        context_codes: Tensor | None = None,
    ) -> Tensor:
        """This level's training loss (the subclass's `_loss`).

        Args:
            codes: the level's codes [B, h, w] long.
            text_states: text features [B, T, H].
            text_mask: bool [B, T], True at real tokens.
            context_codes: the top map [B, t, t] that conditions the bottom prior, else None.
        """
        check_codes(codes, self.side, "codes")
        return self._loss(codes.flatten(1), text_states, text_mask, self.net.context(context_codes))

    def _loss(self, target: Tensor, text_states: Tensor, text_mask: Tensor, context: Tensor | None) -> Tensor:
        """The loss on the codes target [B, L]; context: the context-code embeddings [B, L, W] or None."""
        raise NotImplementedError

    def _train_logits(
        self, tokens: Tensor, text_states: Tensor, text_mask: Tensor, context: Tensor | None, causal: bool
    ) -> Tensor:
        """The network's logits [B, L, V] for training tokens [B, L]; in training mode each sample's text is
        replaced by the null text with P = cond_dropout (classifier-free guidance)."""
        p = self.config.cond_dropout if self.training else 0.0
        states, mask = self.conditioner.drop(text_states, text_mask, p)
        return self.net(tokens, self.net.text_kv(states), mask, context, causal=causal)

    @torch.no_grad()
    def sample(
        self,
        text_states: Tensor | None,
        text_mask: Tensor | None = None,
        *,
        options: SampleOptions = SampleOptions(),
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        context_codes: Tensor | None = None,
        init_codes: Tensor | None = None,
        edit_mask: Tensor | None = None,
        on_step: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Sample a code map [B, h, w] for the text. Call in eval mode.

        Args:
            text_states: text features [B, T, H], or None to sample without text (num_samples rows).
            text_mask: bool [B, T], True at real tokens (all True if None).
            options: guidance, temperature, top-k / top-p and each prior family's own options.
            num_samples: the batch when no text_states, init_codes or context_codes give it.
            generator: source of the random draws (None: torch's global generator).
            context_codes: the top map [B, t, t] that conditions the bottom prior.
            init_codes: codes [B, h, w] to edit: with edit_mask (bool [B, h, w], True = re-sample) only those
                positions are generated and the others kept; without it every position is re-sampled. A
                re-sampled position of the autoregressive prior only sees the codes before it in raster
                order (the masked prior is the natural editor).
            on_step: called as on_step(step, tokens [B, L]) after every decoding step (a parallel step of
                the masked prior, a position of the autoregressive one); undecided positions hold V.
        """
        batch = batch_size_of(text_states, init_codes, context_codes, num_samples)
        device = self.net.pos_embed.device
        undecided = self.config.codebook_size
        tokens = torch.full((batch, self.seq_len), undecided, dtype=torch.long, device=device)
        resample = torch.ones_like(tokens, dtype=torch.bool)
        if init_codes is not None:
            check_codes(init_codes, self.side, "init_codes")
            if edit_mask is not None:
                resample = edit_mask.to(device).flatten(1).bool().clone()
            tokens = init_codes.to(device).flatten(1).masked_fill(resample, undecided)
        cond = make_conditioning(self.conditioner, text_states, text_mask, options.guidance, batch)
        context = cond.rows(self.net.context(context_codes))  # [repeats*B, L, W] or None
        tokens = self._decode(DecodeRun(tokens, resample, cond, context, options, generator, on_step))
        return tokens.view(batch, self.side, self.side)

    def _decode(self, run: DecodeRun) -> Tensor:
        """Generate `run.resample`'s positions of `run.tokens`; returns the finished codes [B, L]."""
        raise NotImplementedError
