"""The image-to-image head: translate, upscale and segment from a source image and an instruction.

    source pixels x [B, C, S, S] ──► U-Net encoder (S, S/2, S/4) ──► bottleneck at S/4 ──► decoder ──► out
    f_local [B, L, Dv] (source patch features) ──► linear ──► g x g grid ──► resized to S/4 ─┘ (added)
    [text CLS of the instruction ‖ mean_q f_q of the source] ──► MLP ──► FiLM (scale, shift) at every level
    out: translate / upscale  image = x + conv(features)      (a residual over the source)
         segment              mask logits = conv(features)   [B, 1, S, S]

f_q and the instruction's [CLS] come from the encoder's generation-role passes (as TIG's inputs do), so the
image-to-image loss trains the encoder's passes it uses and this head, and nothing else.

Why not the VQ decoder: every image the TIG path makes is decoded from codes, and its reconstruction of
held-out 64 px films is 23.8-24.2 dB on the frozen-encoder path (docs/results.md). A bone-suppressed film is
already about 31 dB from its radiograph, so a VQ-decoded translation would lose to the unchanged source; and
super-resolution has to keep the source's pixels. The head therefore starts from the source (bicubic-resized
for upscaling) and learns the change, which is zero at initialisation (zero-initialised output conv).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medunifier.config import I2IConfig, ImageConfig

__all__ = ["ImageToImageHead", "i2i_loss", "soft_dice"]


class _Block(nn.Module):
    """conv3x3 -> GroupNorm -> FiLM -> SiLU, with a residual when the width is kept."""

    def __init__(self, c_in: int, c_out: int, cond: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(min(8, c_out), c_out)
        self.film = nn.Linear(cond, 2 * c_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.residual = c_in == c_out and stride == 1

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)  # [B, c_out, 1, 1] each
        h = F.silu(self.norm(self.conv(x)) * (1 + scale) + shift)
        return x + h if self.residual else h


class ImageToImageHead(nn.Module):
    """(source, f_q, f_local, instruction [CLS]) -> target image (residual over the source) or mask logits."""

    def __init__(self, cfg: I2IConfig, image: ImageConfig, query_width: int, vision_width: int, num_patches: int,
                 text_width: int):
        super().__init__()
        self.grid = math.isqrt(num_patches)
        if self.grid * self.grid != num_patches:
            raise ValueError(f"the image-to-image head needs a square patch grid, got num_patches={num_patches}")
        w, ch, cond = cfg.channels, image.channels, 4 * cfg.channels
        self.cond = nn.Sequential(nn.LayerNorm(text_width + query_width), nn.Linear(text_width + query_width, cond),
                                  nn.SiLU(), nn.Linear(cond, cond))
        self.local = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, 4 * w))
        self.stem = _Block(ch, w, cond)
        self.enc0 = nn.ModuleList(_Block(w, w, cond) for _ in range(cfg.blocks))
        self.down1 = _Block(w, 2 * w, cond, stride=2)
        self.enc1 = nn.ModuleList(_Block(2 * w, 2 * w, cond) for _ in range(cfg.blocks))
        self.down2 = _Block(2 * w, 4 * w, cond, stride=2)
        self.mid = nn.ModuleList(_Block(4 * w, 4 * w, cond) for _ in range(max(1, cfg.blocks)))
        self.up1 = _Block(4 * w + 2 * w, 2 * w, cond)
        self.dec1 = nn.ModuleList(_Block(2 * w, 2 * w, cond) for _ in range(cfg.blocks))
        self.up0 = _Block(2 * w + w, w, cond)
        self.dec0 = nn.ModuleList(_Block(w, w, cond) for _ in range(cfg.blocks))
        self.to_image = nn.Conv2d(w, ch, 3, padding=1)
        self.to_mask = nn.Conv2d(w, 1, 3, padding=1)
        nn.init.zeros_(self.to_image.weight)  # the head starts as the identity on the source
        nn.init.zeros_(self.to_image.bias)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: Tensor, cond: Tensor) -> Tensor:
        for block in blocks:
            x = block(x, cond)
        return x

    def features(self, source: Tensor, query_states: Tensor, local_features: Tensor, text_cls: Tensor) -> Tensor:
        """The decoder's full-resolution features [B, w, S, S]."""
        cond = self.cond(torch.cat([text_cls, query_states.mean(1)], dim=-1))  # [B, 4w]
        e0 = self._run(self.enc0, self.stem(source, cond), cond)  # [B, w, S, S]
        e1 = self._run(self.enc1, self.down1(e0, cond), cond)  # [B, 2w, S/2, S/2]
        m = self.down2(e1, cond)  # [B, 4w, S/4, S/4]
        local = self.local(local_features).transpose(1, 2).unflatten(2, (self.grid, self.grid))  # [B, 4w, g, g]
        m = self._run(self.mid, m + F.interpolate(local, size=m.shape[-2:], mode="bilinear", align_corners=False),
                      cond)
        d1 = self.up1(torch.cat([F.interpolate(m, scale_factor=2.0, mode="nearest"), e1], dim=1), cond)
        d1 = self._run(self.dec1, d1, cond)  # [B, 2w, S/2, S/2]
        d0 = self.up0(torch.cat([F.interpolate(d1, scale_factor=2.0, mode="nearest"), e0], dim=1), cond)
        return self._run(self.dec0, d0, cond)  # [B, w, S, S]

    def forward(self, source: Tensor, query_states: Tensor, local_features: Tensor, text_cls: Tensor
                ) -> tuple[Tensor, Tensor]:
        """(images [B, C, S, S] = source + change, normalised like the inputs; mask logits [B, 1, S, S]).

        Args:
            source: the source image, normalised, at the model's image size (a low-resolution source resized).
            query_states: f_q of the source [B, Q, H].
            local_features: the source's patch features [B, L, Dv].
            text_cls: the instruction's text [CLS] state [B, H].
        """
        h = self.features(source, query_states, local_features, text_cls)
        return source + self.to_image(h), self.to_mask(h)


def soft_dice(probs: Tensor, masks: Tensor, eps: float = 1.0) -> Tensor:
    """Per-image soft Dice [B] of probabilities and {0, 1} masks [B, 1, S, S] (eps keeps empty masks finite)."""
    inter = (probs * masks).flatten(1).sum(1)
    return (2 * inter + eps) / (probs.flatten(1).sum(1) + masks.flatten(1).sum(1) + eps)


LOG_MSE_EPS = 1e-5  # floor of the log-MSE image loss, in normalised pixel units (about 55 dB at std 0.25)


def i2i_loss(images: Tensor, mask_logits: Tensor, targets: Tensor, masks: Tensor, is_mask: Tensor, *,
             image_loss: str = "mse", mask_pos_weight: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over items of the image loss (image items) or BCE + (1 - soft Dice) (segment items).

    Args:
        images, targets: [B, C, S, S]; mask_logits, masks: [B, 1, S, S]; is_mask: bool [B] (segment items).
        image_loss: "mse" (per-item MSE of normalised pixels) or "log_mse" (its log plus a small floor): the
            log's gradient is the MSE's divided by the item's own error, so every item counts by its relative
            error and tasks whose errors differ by orders of magnitude train together.
        mask_pos_weight: BCE weight of the mask's positive pixels.
        (The defaults are the plain loss; `I2IConfig` chooses the training defaults.)
    Returns (loss, parts) with parts "i2i_mse" (plain MSE, whatever the loss) and "i2i_dice" (means over their
    items; absent without any).
    """
    if image_loss not in ("mse", "log_mse"):
        raise ValueError(f"image_loss must be 'mse' or 'log_mse', got {image_loss!r}")
    per_item = images.new_zeros(images.shape[0], dtype=torch.float32)
    parts: dict[str, Tensor] = {}
    image_items = ~is_mask
    if image_items.any():
        mse = (images.float() - targets.float()).pow(2).flatten(1).mean(1)  # [B]
        item_loss = (mse + LOG_MSE_EPS).log() if image_loss == "log_mse" else mse
        per_item = torch.where(image_items, item_loss, per_item)
        parts["i2i_mse"] = mse[image_items].mean().detach()
    if is_mask.any():
        logits = mask_logits.float()
        pos_weight = logits.new_tensor(mask_pos_weight)
        bce = F.binary_cross_entropy_with_logits(logits, masks.float(), reduction="none", pos_weight=pos_weight)
        dice = soft_dice(logits.sigmoid(), masks.float())
        per_item = torch.where(is_mask, bce.flatten(1).mean(1) + 1 - dice, per_item)
        parts["i2i_dice"] = dice[is_mask].mean().detach()
    return per_item.mean(), parts
