"""The normal chest of SynthCXR: a patient's coordinates and lung outlines (`Anatomy`), and the attenuation
of body, diaphragm, heart, mediastinum, lungs with their vessel markings, airways and bones (`draw_anatomy`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medunifier.data.synthcxr.primitives import coordinate_grid, ellipse, polyline, ramp, smooth_noise
from medunifier.data.synthcxr.sampling import SIDE_SIGN

__all__ = ["Anatomy", "draw_anatomy", "heart_shape"]


class Anatomy:
    """Coordinates and masks of one patient, shared by the finding painters.

    Args:
        p: the patient parameters of a `Case` (rotation, zoom, shift, thorax width, domes, mediastinum).
        size: the image side in pixels.
    """

    def __init__(self, p: dict[str, Any], size: int) -> None:
        theta = math.radians(p["rotation_deg"])
        gx, gy = coordinate_grid(size)
        c, s, z = math.cos(theta), math.sin(theta), p["zoom"]
        self.size = size
        self.x = ((c * gx + s * gy) / z - p["shift"][0]).astype(np.float32)
        self.y = ((-s * gx + c * gy) / z - p["shift"][1]).astype(np.float32)
        self.px = 2.0 / size  # one pixel in normalised units
        self.edge = max(1.5 * self.px, 0.025)  # soft anatomical borders
        self.line_w = max(0.01, 0.9 * self.px)  # half-width of thin lines: pleura, tubes, plates
        self.w = p["thorax_half_width"]
        self.top = p["apex_y"]
        self.dome = {"right": p["dome_right_y"], "left": p["dome_left_y"]}
        self.curve = p["dome_curve"]
        self.mshift = p["mediastinal_shift"]
        self.med0 = p["mediastinum_half_width"]
        # lung outline: half-width grows from the apex down to the bases
        cy = max(self.dome.values()) + 0.15
        height = cy - self.top
        self.half_width = self.w * np.sqrt(np.clip(1.0 - ((self.y - cy) / height) ** 2, 0.0, 1.0))
        self.medial = self.med0 + 0.03 * (self.y + 1.0)  # mediastinal half-width at each row
        ax = np.abs(self.x - self.mshift)
        self.ax = ax
        self.central = np.zeros_like(self.x)  # heart + mediastinum, set by draw_anatomy
        self.lung_nodome: dict[str, np.ndarray] = {}  # each lung, not cut by its diaphragm dome
        self.lung: dict[str, np.ndarray] = {}
        for side, sgn in SIDE_SIGN.items():
            region = (ramp(self.half_width - np.abs(self.x), self.edge)
                      * ramp(sgn * (self.x - self.mshift) - self.medial, self.edge)
                      * ramp(self.y - self.top, self.edge))
            self.lung_nodome[side] = region
            self.lung[side] = region * ramp(self.dome_y(side) - self.y, self.edge)

    def dome_y(self, side: str) -> np.ndarray:
        sgn = SIDE_SIGN[side]
        return self.dome[side] + self.curve * ((self.x - sgn * 0.4 * self.w) / (0.6 * self.w)) ** 2

    def zone_point(self, rng: np.random.Generator, side: str, zone: str | None, lateral: tuple[float, float]
                   ) -> tuple[float, float]:
        """A point inside the lung of `side` in `zone` (thirds of the apex-to-dome height)."""
        bottom = self.dome[side] + 0.5 * self.curve
        length = bottom - self.top
        third = {"upper": 0, "middle": 1, "lower": 2}[zone or "lower"]
        y = self.top + length * (third + rng.uniform(0.2, 0.8)) / 3.0
        cy = max(self.dome.values()) + 0.15
        half = self.w * math.sqrt(max(0.0, 1.0 - ((y - cy) / (cy - self.top)) ** 2))
        med = self.med0 + 0.03 * (y + 1.0)
        frac = rng.uniform(*lateral)
        return SIDE_SIGN[side] * (med + frac * max(half - med, 0.05)) + self.mshift, y


def _vessels(a: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Lung markings: branching streaks radiating from each hilum, tapering and fading outwards.

    The streaks are the zero crossings of a few random angular waves around the hilum (cheap
    cosines instead of a noise lookup), bent by a radial term so that they branch and curve.
    """
    out = np.zeros_like(a.x)
    for side, sgn in SIDE_SIGN.items():
        dx = sgn * (a.x - a.mshift) - (a.med0 + 0.05)
        dy = a.y + 0.08
        r = np.sqrt(dx * dx + dy * dy)
        theta = np.arctan2(dy, dx)
        streaks = np.zeros_like(r)
        for scale, weight in ((1.0, 1.0), (2.0, 0.6)):
            wave = np.zeros_like(r)
            for _ in range(3):
                freq = int(rng.integers(6, 16)) * scale
                bend = rng.uniform(-5.0, 5.0) * scale
                wave += np.cos(freq * theta + bend * r + rng.uniform(0, 2 * math.pi))
            streaks += weight * np.clip(1.0 - np.abs(wave) * (1.5 + 4.0 * r), 0.0, 1.0) ** 2
        out += streaks * np.exp(-r / 0.55) * a.lung_nodome[side]
    return out


def heart_shape(a: Anatomy, p: dict[str, Any]) -> tuple[np.ndarray, float]:
    """The heart (S, S): an ellipse sitting on the diaphragm whose horizontal extent gives the cardiothoracic
    ratio; and the row of its centre."""
    half = p["ctr"] * a.w * p.get("heart_magnification", 1.0)
    ry, tilt = p["heart_height"] + 0.1, 0.5 * p["heart_tilt"]
    rx = math.sqrt(max(half * half - (ry * math.sin(tilt)) ** 2, (0.6 * half) ** 2)) / math.cos(tilt)
    hx = a.mshift + 0.35 * half - 0.04
    hy = 0.5 * (a.dome["right"] + a.dome["left"]) + 0.02
    return ellipse(a.x, a.y, hx, hy, rx, ry, 0.035, angle=-tilt), hy


def draw_anatomy(a: Anatomy, p: dict[str, Any], rng: np.random.Generator, bones: float = 1.0,
                  layers: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation of a normal chest (S, S) and its lung-marking map (S, S).

    Args:
        bones: scale of the bone terms (spine, ribs, clavicles): 1 draws them, 0 leaves them out. Every
            other term and every random draw is the same whatever the value, so a bone-suppressed film
            differs from the full one only where a bone term is non-zero.
        layers: when given, receives "bone" (S, S), the unscaled bone attenuation.
    """
    x, y, ax, size = a.x, a.y, a.ax, a.size
    # body and soft tissue; the shoulders widen the silhouette smoothly towards the top
    shoulders = np.clip(-(y + 0.35) / 0.65, 0.0, 1.0) ** 1.5
    body_half = a.w + 0.1 * p["soft_tissue"] + 0.35 * shoulders
    body = ramp(body_half - np.abs(x), 0.08)
    profile = np.sqrt(np.clip(1 - (x / (body_half + 0.05)) ** 2, 0, 1))
    atten = body * (0.4 + 0.05 * p["soft_tissue"] + 0.12 * profile)
    atten += 0.03 * smooth_noise(rng, size, 5) * body

    # diaphragm and abdomen (liver on the right, gastric air bubble under the left dome)
    dome = np.where(x < a.mshift, a.dome_y("right"), a.dome_y("left"))
    abdomen = ramp(y - dome, a.edge) * body
    atten += abdomen * (0.15 + 0.05 * np.clip((y - dome) / 0.4, 0, 1))
    bubble = ellipse(x, y, a.mshift + 0.42 * a.w, a.dome["left"] + 0.09, 0.1, 0.05, 0.03)
    atten -= 0.14 * bubble * abdomen

    heart, hy = heart_shape(a, p)
    # mediastinum (great vessels), aortic knob, hila
    mediastinum = ramp(a.medial + 0.02 - ax, 0.04) * ramp(hy - y, 0.1)
    knob = ellipse(x, y, a.mshift + a.med0 + 0.03, -0.4, 0.075, 0.065, 0.03)
    hila = sum(np.exp(-(((x - a.mshift - s * (a.med0 + 0.07)) / 0.07) ** 2 + ((y + 0.08) / 0.12) ** 2))
               for s in (-1.0, 1.0))
    central = np.maximum(np.maximum(heart, mediastinum), knob)
    a.central = central
    atten += 0.2 * central * (1.0 - abdomen) + 0.05 * hila

    # lungs: air, less near the periphery and under the shoulder soft tissue at the apices
    lungs = a.lung["right"] + a.lung["left"]
    depth = 0.75 + 0.25 * np.clip((a.half_width - np.abs(x)) / 0.25, 0, 1)
    apex = 0.7 + 0.3 * np.clip((y - a.top) / 0.35, 0, 1)
    air = lungs * (1.0 - 0.92 * central) * depth * apex
    atten -= 0.36 * air
    atten += 0.04 * smooth_noise(rng, size, 8) * lungs  # parenchymal mottle
    markings = _vessels(a, rng)

    # trachea and main bronchi (air over the mediastinum)
    carina = -0.28
    trachea = ramp(0.035 - np.abs(x - a.mshift * 0.5), 0.02) * ramp(carina - y, 0.03)
    bronchi = polyline(x, y, [(a.mshift - 0.14, carina + 0.13), (a.mshift, carina), (a.mshift + 0.15, carina + 0.15)],
                        0.025)
    atten -= 0.1 * np.maximum(trachea, bronchi) * (1.0 - air)

    # bones: spine, posterior and anterior ribs, clavicles
    spine = ramp(0.06 - ax, 0.03) * body
    vertebrae = 0.8 + 0.2 * np.cos(2 * math.pi * (y - a.top) / 0.11)
    atten += bones * 0.035 * spine * vertebrae
    phase = (y - a.top - (-0.15 * ax + 0.6 * ax * ax)) / p["rib_spacing"]
    ribs = np.clip((np.cos(2 * math.pi * phase) - 0.35) * 2.5, 0.0, 1.0)
    cage = (ramp(a.half_width + 0.06 - np.abs(x), a.edge) * ramp(ax - 0.07, a.edge)
            * ramp(y - a.top + 0.08, a.edge) * (1.0 - 0.7 * abdomen))
    phase_a = (y - a.top + 0.5 * ax) / (1.2 * p["rib_spacing"])
    anterior = np.clip((np.cos(2 * math.pi * phase_a + 1.3) - 0.5) * 2.0, 0.0, 1.0)
    rib_atten = cage * (0.065 * ribs + 0.025 * anterior * ramp(ax - 0.25, 0.1))
    atten += bones * rib_atten
    clav_y = -0.74 + 0.05 * (a.top + 0.84) - 0.18 * (ax - 0.08) + 0.12 * (ax - 0.08) ** 2
    clavicle = ramp(0.034 - np.abs(y - clav_y), 0.015) * ramp(ax - 0.07, a.edge) * ramp(0.75 - ax, a.edge)
    atten += bones * 0.09 * clavicle
    if layers is not None:
        layers["bone"] = (0.035 * spine * vertebrae + rib_atten + 0.09 * clavicle).astype(np.float32)

    if p["breast_shadows"]:
        for s in (-1.0, 1.0):
            breast = ellipse(x, y, s * 0.6 * a.w + a.mshift, a.dome["right"] - 0.02, 0.42, 0.3, 0.1)
            atten += 0.06 * breast * ramp(y - (a.dome["right"] - 0.25), 0.2)
    return atten, markings
