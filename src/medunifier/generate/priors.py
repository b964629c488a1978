"""Text-conditioned priors over the frozen VQ model's (top, bottom) code maps.

    top prior:    p(top | text)            top [B, top_size, top_size]
    bottom prior: p(bottom | text, top)    bottom [B, bottom_size, bottom_size]; the top codes are embedded,
                                           upsampled (nearest) and added to the bottom token embeddings

One class per level and decoding family (`MaskedCodePrior`, `AutoregressiveCodePrior`, same `loss` /
`sample` signature); `HierarchicalPrior` holds one of each level. Text is the image-text encoder's text-only
features [B, T, H] with a padding mask [B, T]; see prior_common for condition dropout and guidance.
Weights are plain `state_dict()` tensors (save them with safetensors).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medunifier.generate.ar_prior import AutoregressiveCodePrior
from medunifier.generate.masked_prior import MaskedCodePrior
from medunifier.generate.prior_common import (
    PriorConfig,
    cosine_schedule,
    masked_count_schedule,
    resize_mask,
)

CodePrior = MaskedCodePrior | AutoregressiveCodePrior

__all__ = [
    "AutoregressiveCodePrior",
    "CodePrior",
    "HierarchicalPrior",
    "MaskedCodePrior",
    "PriorConfig",
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
        num_samples: int | None = None,
        guidance: float = 1.0,
        steps: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        init_codes: tuple[Tensor, Tensor] | None = None,
        edit_mask: Tensor | None = None,
        use_cache: bool = True,
        confidence_noise: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """Sample (top [B, t, t], bottom [B, b, b]) codes for the text (unconditional if text_states is None).

        Editing: init_codes = (top, bottom) of an encoded image and edit_mask bool [B, h, w] at any resolution
        (e.g. the image's): it is resized to each level (a code is re-sampled if any covered cell is True);
        the other codes are kept, and the bottom is re-sampled conditioned on the edited top.
        steps, confidence_noise: masked prior only (per level). use_cache: autoregressive prior only.
        """
        kwargs = dict(
            guidance=guidance, steps=steps, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator, use_cache=use_cache,
        )  # fmt: skip
        if isinstance(self.top, MaskedCodePrior):
            kwargs["confidence_noise"] = confidence_noise
        init_top, init_bottom = init_codes if init_codes is not None else (None, None)
        edit_top = edit_bottom = None
        if edit_mask is not None:
            if init_codes is None:
                raise ValueError("edit_mask needs init_codes (the codes to keep outside the mask)")
            edit_top = resize_mask(edit_mask.bool(), self.config.top_size)
            edit_bottom = resize_mask(edit_mask.bool(), self.config.bottom_size)
        top = self.top.sample(
            text_states, text_mask, num_samples=num_samples, init_codes=init_top, edit_mask=edit_top, **kwargs
        )
        bottom = self.bottom.sample(
            text_states, text_mask, context_codes=top, init_codes=init_bottom, edit_mask=edit_bottom, **kwargs
        )
        return top, bottom
