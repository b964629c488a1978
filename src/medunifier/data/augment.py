"""Batch-level image augmentation: a random affine warp (zoom, rotation, shift) and intensity jitter.

It runs on the collated batch, on whatever device the batch is on, so it costs one `grid_sample` per
batch rather than Pillow work per image in the data workers. The random parameters are drawn on the
CPU from the global torch RNG (or a `generator`), whose state the training checkpoints save: an
augmented run resumes exactly. An edit record's source image gets the same warp as its target, so the
pair stays aligned. Settings: `train.augment` (`medunifier.config.AugmentConfig`), off by default.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medunifier.config import AugmentConfig


def warp(pixel_values: Tensor, zoom: Tensor, angle_degrees: Tensor, shift: Tensor, flip: Tensor | None = None) -> Tensor:
    """Resample [B, C, S, S] images through per-image affine maps; borders repeat the edge pixels.

    zoom [B] (>= 1 magnifies: 1 / zoom of the side is shown), angle_degrees [B] (positive turns the
    content counter-clockwise as displayed, row 0 at the top), shift [B, 2] (x, y as fractions of the
    image size; positive moves the content right / down), flip [B] bool (mirror left-right first).
    """
    b = pixel_values.shape[0]
    theta = torch.deg2rad(angle_degrees.float())
    cos, sin = torch.cos(theta) / zoom.float(), torch.sin(theta) / zoom.float()
    sign = torch.ones(b) if flip is None else 1.0 - 2.0 * flip.float()
    # affine_grid maps each output location (x right, y down, in [-1, 1]) to the input location it reads
    matrix = torch.zeros(b, 2, 3)
    matrix[:, 0, 0] = cos * sign
    matrix[:, 0, 1] = -sin
    matrix[:, 1, 0] = sin * sign
    matrix[:, 1, 1] = cos
    matrix[:, :, 2] = -2.0 * shift.float()  # a shift of the content is the opposite shift of the sampling
    matrix = matrix.to(device=pixel_values.device, dtype=pixel_values.dtype)
    grid = F.affine_grid(matrix, list(pixel_values.shape), align_corners=False)  # [B, S, S, 2]
    return F.grid_sample(pixel_values, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter(pixel_values: Tensor, brightness: Tensor, contrast: Tensor) -> Tensor:
    """Per image: scale the deviation from its own mean by contrast [B], then add brightness [B]."""
    b = pixel_values.shape[0]
    mean = pixel_values.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    c = contrast.to(pixel_values).view(b, 1, 1, 1)
    return (pixel_values - mean) * c + mean + brightness.to(pixel_values).view(b, 1, 1, 1)


def draw_parameters(config: AugmentConfig, batch_size: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The random parameters of one batch (CPU tensors), in a fixed draw order."""

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    area = uniform(config.scale[0], config.scale[1], batch_size)
    return {
        "zoom": 1.0 / area.sqrt(),
        "angle": uniform(-config.rotate_degrees, config.rotate_degrees, batch_size),
        "shift": uniform(-config.translate, config.translate, batch_size, 2),
        "flip": (torch.rand(batch_size, generator=generator) < 0.5) & config.hflip,
        "brightness": uniform(-config.brightness, config.brightness, batch_size),
        "contrast": uniform(1.0 - config.contrast, 1.0 + config.contrast, batch_size),
    }


def apply_parameters(pixel_values: Tensor, params: dict[str, Tensor]) -> Tensor:
    flip = params["flip"] if bool(params["flip"].any()) else None
    warped = warp(pixel_values, params["zoom"], params["angle"], params["shift"], flip)
    return jitter(warped, params["brightness"], params["contrast"])


def augment_batch(batch: dict[str, Any], config: AugmentConfig, generator: torch.Generator | None = None) -> dict[str, Any]:
    """A copy of a training batch with `pixel_values` (and `source_pixel_values`, same warp) augmented."""
    if not config.enabled:
        return batch
    pixels: Tensor = batch["pixel_values"]
    params = draw_parameters(config, pixels.shape[0], generator)
    out = dict(batch)
    out["pixel_values"] = apply_parameters(pixels, params)
    if "source_pixel_values" in batch:
        out["source_pixel_values"] = apply_parameters(batch["source_pixel_values"], params)
    return out


__all__ = ["apply_parameters", "augment_batch", "draw_parameters", "jitter", "warp"]
