"""Text-conditioned priors over the frozen VQ model's (top, bottom) code maps.

    top prior:    p(top | text)            top [B, top_size, top_size]
    bottom prior: p(bottom | text, top)    bottom [B, bottom_size, bottom_size]; the top codes are embedded,
                                           upsampled (nearest) and added to the bottom token embeddings

One class per level and decoding family (`MaskedCodePrior`, `AutoregressiveCodePrior`: same `loss`
signature, one `BaseCodePrior.sample` whose `SampleOptions` say how to draw); `HierarchicalPrior` holds one
of each level. Text is the image-text encoder's text-only features [B, T, H] with a padding mask [B, T];
see prior_common for condition dropout and guidance.
Weights are plain `state_dict()` tensors (save them with safetensors).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medunifier.generate.ar_prior import AutoregressiveCodePrior
from medunifier.generate.masked_prior import MaskedCodePrior
from medunifier.generate.prior_base import BaseCodePrior, SampleOptions
from medunifier.generate.prior_common import (
    PriorConfig,
    cosine_schedule,
    masked_count_schedule,
    resize_mask,
)

CodePrior = MaskedCodePrior | AutoregressiveCodePrior

__all__ = [
    "AutoregressiveCodePrior",
    "BaseCodePrior",
    "CodePrior",
    "HierarchicalPrior",
    "MaskedCodePrior",
    "PriorConfig",
    "SampleOptions",
    "build_code_prior",
    "cosine_schedule",
    "masked_count_schedule",
]


def build_code_prior(config: PriorConfig, side: int, context_side: int | None = None) -> CodePrior:
    """The prior of `config.kind` for one level (context_side: side of the conditioning top map, or None)."""
    cls = MaskedCodePrior if config.kind == "masked" else AutoregressiveCodePrior
    return cls(config, side, context_side)


class HierarchicalPrior(nn.Module):
    """Top prior p(top | text) and bottom prior p(bottom | text, top), same decoding family."""

    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.config = config
        self.top = build_code_prior(config, config.top_size)
        self.bottom = build_code_prior(config, config.bottom_size, context_side=config.top_size)

    def loss(self, top: Tensor, bottom: Tensor, text_states: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
        """{"loss": top + bottom, "top": ..., "bottom": ...}; the bottom prior is teacher-forced on the true top."""
        loss_top = self.top.loss(top, text_states, text_mask)
        loss_bottom = self.bottom.loss(bottom, text_states, text_mask, context_codes=top)
        return {"loss": loss_top + loss_bottom, "top": loss_top, "bottom": loss_bottom}

    @torch.no_grad()
    def sample_codes(
        self,
        text_states: Tensor | None,
        text_mask: Tensor | None = None,
        *,
        options: SampleOptions = SampleOptions(),
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        init_codes: tuple[Tensor, Tensor] | None = None,
        edit_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sample (top [B, t, t], bottom [B, b, b]) codes for the text; the bottom is conditioned on the top.

        Args:
            text_states, text_mask, num_samples, generator: as in `BaseCodePrior.sample`.
            options: how both levels draw (steps and confidence_noise are per level).
            init_codes: (top, bottom) of an encoded image to edit.
            edit_mask: bool [B, h, w] at any resolution (e.g. the image's), with init_codes: it is resized to
                each level (a code is re-sampled if any covered cell is True); the other codes are kept, and
                the bottom is re-sampled conditioned on the edited top.
        """
        init_top, init_bottom = init_codes if init_codes is not None else (None, None)
        edit_top = edit_bottom = None
        if edit_mask is not None:
            if init_codes is None:
                raise ValueError("edit_mask needs init_codes (the codes to keep outside the mask)")
            edit_top = resize_mask(edit_mask.bool(), self.config.top_size)
            edit_bottom = resize_mask(edit_mask.bool(), self.config.bottom_size)
        top = self.top.sample(
            text_states, text_mask, options=options, num_samples=num_samples, generator=generator,
            init_codes=init_top, edit_mask=edit_top,
        )  # fmt: skip
        bottom = self.bottom.sample(
            text_states, text_mask, options=options, generator=generator, context_codes=top,
            init_codes=init_bottom, edit_mask=edit_bottom,
        )  # fmt: skip
        return top, bottom
