"""Drawing primitives of SynthCXR: coordinate grids, smooth noise, soft steps, ellipses and polylines, all
vectorised numpy on (S, S) float32 maps in normalised image coordinates (-1 .. 1 on both axes)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = ["coordinate_grid", "ellipse", "polyline", "ramp", "smooth_noise"]


@lru_cache(maxsize=16)
def coordinate_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (size, size) float32 in -1 .. 1."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    x, y = np.meshgrid(c, c)
    return x, y  # (S, S) each; x to the image right, y down


@lru_cache(maxsize=64)
def _upsample_matrix(size: int, k: int) -> np.ndarray:
    """(size, k) smooth interpolation weights from a k-point grid spanning the image."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) / size * (k - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, k - 2)
    t = pos - i0
    t = t * t * (3.0 - 2.0 * t)  # smoothstep: no visible grid seams
    m = np.zeros((size, k), dtype=np.float32)
    m[np.arange(size), i0] = 1.0 - t
    m[np.arange(size), i0 + 1] = t
    return m


def smooth_noise(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    """Zero-mean unit-ish smooth noise: a k x k normal grid upsampled to (size, size)."""
    k = max(2, min(k, size))
    m = _upsample_matrix(size, k)
    return m @ rng.standard_normal((k, k)).astype(np.float32) @ m.T


def ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 for d << 0, 1 for d >> 0, linear over `width`."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, width: float,
            angle: float = 0.0) -> np.ndarray:
    """Soft filled ellipse centred on (cx, cy) with radii (rx, ry), rotated by `angle` radians; its edge
    ramps over `width`."""
    dx, dy = x - cx, y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    r = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    return ramp((1.0 - r) * min(rx, ry), width)


def polyline(x: np.ndarray, y: np.ndarray, points: Sequence[tuple[float, float]], half_width: float) -> np.ndarray:
    """Soft line along a polyline: exp(-(distance / half_width)^2)."""
    d2 = None
    for (ax, ay), (bx, by) in itertools.pairwise(points):
        vx, vy = bx - ax, by - ay
        t = np.clip(((x - ax) * vx + (y - ay) * vy) / max(vx * vx + vy * vy, 1e-9), 0.0, 1.0)
        seg = (x - ax - t * vx) ** 2 + (y - ay - t * vy) ** 2
        d2 = seg if d2 is None else np.minimum(d2, seg)
    return np.exp(-d2 / (half_width * half_width))
