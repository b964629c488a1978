"""Small helpers every layer may use: PSNR, process rank and world size, JSON encoding, HTML tables, option checks.

This module sits at the bottom of the package with `config`: it imports nothing from medunifier.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from torch import Tensor

__all__ = ["PSNR_CAP_DB", "ChannelStat", "check_fields", "denormalise", "html_table", "jsonable", "launch_rank_world",
           "normalise", "process_group_rank_world", "psnr_db", "psnr_normalised"]

ChannelStat = float | Sequence[float]  # an image normalisation value: one for every channel, or one per channel

PSNR_CAP_DB = 100.0  # identical images: PSNR is infinite, reported as this


@overload
def psnr_db(mse: Tensor, peak: float = 1.0) -> Tensor: ...
@overload
def psnr_db(mse: float, peak: float = 1.0) -> float: ...
def psnr_db(mse: Tensor | float, peak: float = 1.0) -> Tensor | float:
    """Peak signal-to-noise ratio 10 log10(peak^2 / mse) in dB, capped at PSNR_CAP_DB (mse 0 gives the cap).

    Args:
        mse: mean squared error, a float or a 0-d tensor (then the result is a 0-d tensor).
        peak: the largest possible pixel value on the scale `mse` was taken on (1.0 for [0, 1], 255 for uint8).
    """
    if isinstance(mse, Tensor):
        return (10 * torch.log10(peak**2 / mse.float())).clamp_max(PSNR_CAP_DB)
    return PSNR_CAP_DB if mse <= 0 else min(PSNR_CAP_DB, 10.0 * math.log10(peak**2 / mse))


def _per_channel(value: ChannelStat, like: Tensor) -> float | Tensor:
    """A scalar as it is; per-channel values as a [C, 1, 1] tensor on `like`'s device and dtype."""
    if isinstance(value, (int, float)):
        return value
    return torch.tensor([float(v) for v in value], dtype=like.dtype, device=like.device).view(-1, 1, 1)


def normalise(pixels: Tensor, mean: ChannelStat, std: ChannelStat) -> Tensor:
    """[0, 1] pixels [..., C, H, W] -> (x - mean) / std, with one value or one per channel (C values)."""
    return (pixels - _per_channel(mean, pixels)) / _per_channel(std, pixels)


def denormalise(pixels: Tensor, mean: ChannelStat, std: ChannelStat) -> Tensor:
    """The inverse of `normalise`: x * std + mean, back to the [0, 1] scale (not clamped)."""
    return pixels * _per_channel(std, pixels) + _per_channel(mean, pixels)


def psnr_normalised(images: Tensor, targets: Tensor, std: ChannelStat = 0.5) -> Tensor:
    """PSNR in dB on the [0, 1] scale of images normalised as (x - mean) / std: a 0-d tensor.

    Args:
        images, targets: [B, C, H, W] normalised tensors.
        std: the normalisation's std, one value or one per channel (C values).
    """
    diff = images.float() - targets.float()
    return psnr_db((diff * _per_channel(std, diff)).pow(2).mean())


def process_group_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed process group; (0, 1) without one.

    For collectives (all-gather, codebook sync): they need a process group, whatever the launcher set.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launch_rank_world() -> tuple[int, int]:
    """(rank, world size) this process was launched as: the process group's when one is initialised, else
    the RANK and WORLD_SIZE that torchrun and accelerate set before any process group exists; (0, 1) alone."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def jsonable(value: Any, nonfinite_as_str: bool = False) -> Any:
    """`value` with tensors, NumPy values and paths turned into plain JSON types, through dicts, lists and tuples.

    Args:
        value: anything `json.dumps` should write.
        nonfinite_as_str: write NaN and infinities as the strings "nan" / "inf" (JSON has no literal for
            them); otherwise they stay floats, which `json.dumps` writes as NaN / Infinity.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v, nonfinite_as_str) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, nonfinite_as_str) for v in value]
    if isinstance(value, (Tensor, np.ndarray)):
        return jsonable(value.tolist(), nonfinite_as_str)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if nonfinite_as_str and isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def html_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
               cell: Callable[[Any], str] = str) -> str:
    """An <h3> title and a <table>; every header and cell is HTML-escaped.

    Args:
        title: the heading above the table.
        header: column names.
        rows: the cells, row by row.
        cell: turns a cell value into its text before escaping (e.g. a number format).
    """
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>"


def check_fields(owner: object, rules: Iterable[tuple[str, bool, str]]) -> None:
    """Raise one ValueError naming every rule an options object breaks ("Owner.field must be ..., got ...").

    Args:
        owner: the options object: its class names the message, its attributes give the values.
        rules: (field name, whether its rule holds, what the field must be).
    """
    broken = [f"{type(owner).__name__}.{name} must be {rule}, got {getattr(owner, name)!r}"
              for name, ok, rule in rules if not ok]
    if broken:
        raise ValueError("; ".join(broken))
