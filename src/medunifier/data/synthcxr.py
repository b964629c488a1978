"""SynthCXR: a seeded, fast procedural generator of chest-radiograph-like images with reports.

Each image is a frontal chest film drawn in an attenuation-like space with vectorised numpy
(coordinate grids, soft ellipses, smooth noise upsampled from a coarse grid, distance fields for
lines), then tone-mapped: dark aerated lungs with vessel markings radiating from the hila, bright
mediastinum, heart, spine, ribs, clavicles and abdomen under the diaphragm domes. Patients vary in
body habitus (thorax width, soft-tissue thickness, breast shadows), lung shape and diaphragm
height, heart size, PA or portable AP projection (AP magnifies the heart), rotation, position,
exposure, contrast and noise.

API: `write_synthcxr(out, n, size, seed, workers, pairs=0, i2i=0)` writes a dataset (what `medunifier data synth`
runs); `synthesize(n, size, seed)` returns images and records in memory; `generate_sample`,
`sample_case` and `render` are the steps of one image; `generate_pair` / `synthesize_pairs` make
counterfactual pairs.

Counterfactual pairs (stream 2): the same patient (identical parameters, noise seed and findings)
rendered once as drawn and once with one added finding of `PAIR_FINDINGS` (the five competition
findings and pneumothorax, with laterality, zone and severity). The added finding is painted last, so
the two images differ only inside that finding's region (`finding_region`, also written as a PNG):
elsewhere they are identical pixel for pixel. Each image has its own report and labels; an "edit"
record links them with a natural instruction ("add a moderate left pleural effusion").

Findings (names from `data/findings.py`) carry laterality (patient side: "right" is the image's
left), zone (upper/middle/lower) and severity (mild/moderate/severe):

- atelectasis: plate-like linear opacities; moderate/severe add volume loss (raised hemidiaphragm,
  mediastinal shift) and severe is a lobar collapse wedge.
- cardiomegaly: cardiothoracic ratio (CTR) above `cardiomegaly_ctr` (normal hearts use `normal_ctr`).
- consolidation: dense patchy opacity from a noise-modulated blob, air bronchograms when moderate/severe.
- edema: bilateral perihilar haze, thickened markings, Kerley B lines at the bases.
- pleural_effusion: fluid filling the costophrenic angle with a lateral meniscus, obscuring the dome.
- pneumothorax: a lucent rim without lung markings bounded by a thin visceral pleural line.
- nodule: a small round soft-edged opacity (diameter in mm in the report).
- support_devices: ET tube, central line, PICC, pacemaker box with leads, enteric tube.
- no_finding: 1 iff no other finding is present (support devices included).

Difficulty knobs live in `SynthConfig`: `prevalence` (per finding, missing names take the default;
no finding comes out at about 37%), `chf_boost` (edema raises the chance of cardiomegaly and effusion), `severity_weights`,
`subtle_fraction` and `subtle_contrast` (a fraction of positives drawn mild at reduced contrast, so
some lesions are really hard), `finding_contrast` (global opacity scale), `noise_std`, anatomy
ranges (`habitus`, `max_rotation_deg`, `normal_ctr`, `cardiomegaly_ctr`) and `mention_absent`
(how often a report states an absent finding).

Determinism: image i of stream s draws from `SeedSequence(seed, spawn_key=(s, i))`, so the output
does not depend on the number of workers, and PNGs are written with fixed settings: the same seed
gives byte-identical files. Stream 0 is the main set; stream 1 is the 5x200 evaluation set
(200 images for each CheXpert competition finding, that finding alone); stream 2 the pairs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from medunifier.data.findings import COMPETITION_FINDINGS, FINDINGS
from medunifier.data.images import resize_array, save_png
from medunifier.data.manifest import write_manifest
from medunifier.data.reports import (
    DEGREE_WORDS,
    SEVERITIES,
    SIZE_WORDS,
    FindingSpec,
    _location_noun,
    report_text,
    write_report,
)

GENERATOR_VERSION = 1
MAIN_STREAM, EVAL_STREAM, PAIR_STREAM, I2I_STREAM = 0, 1, 2, 3
PAIR_FINDINGS = (*COMPETITION_FINDINGS, "pneumothorax")  # what a counterfactual pair adds
SIDE_SIGN = {"right": -1.0, "left": 1.0}  # patient right is the image's left (x < 0)

DEFAULT_PREVALENCE = {
    "atelectasis": 0.15,
    "cardiomegaly": 0.14,
    "consolidation": 0.11,
    "edema": 0.09,
    "pleural_effusion": 0.14,
    "pneumothorax": 0.06,
    "nodule": 0.09,
    "support_devices": 0.15,
}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; the defaults give a dataset that is learnable but not trivial."""

    prevalence: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PREVALENCE))
    chf_boost: float = 0.25  # added to P(cardiomegaly) and P(effusion) when edema is present
    severity_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)  # mild, moderate, severe
    subtle_fraction: float = 0.2  # positives drawn as mild and low-contrast
    subtle_contrast: float = 0.55  # opacity scale of subtle findings
    finding_contrast: float = 1.0  # global opacity scale of every finding
    noise_std: tuple[float, float] = (0.012, 0.035)  # per-pixel quantum noise range
    habitus: tuple[float, float] = (0.72, 0.9)  # half-width of the rib cage (image half-width = 1)
    max_rotation_deg: float = 5.0
    normal_ctr: tuple[float, float] = (0.38, 0.515)
    cardiomegaly_ctr: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "mild": (0.525, 0.57), "moderate": (0.57, 0.63), "severe": (0.63, 0.72)})
    subtle_ctr: tuple[float, float] = (0.52, 0.545)
    mention_absent: float = 0.6  # probability that a report states a given absent finding
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ sampling a case


@dataclass
class Case:
    """What one image shows: the patient's anatomy and the positive findings."""

    patient: dict[str, Any]
    findings: list[FindingSpec]

    def labels(self) -> dict[str, int]:
        present = {f.name for f in self.findings}
        labels = {name: int(name in present) for name in FINDINGS}
        labels["no_finding"] = int(not present)
        return labels


def _r(x: float) -> float:
    return round(float(x), 4)


def _choice(rng: np.random.Generator, options: Sequence[str], weights: Sequence[float]) -> str:
    p = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _sample_patient(rng: np.random.Generator, cfg: SynthConfig) -> dict[str, Any]:
    dome_right = rng.uniform(0.18, 0.32)
    return {
        "sex": "F" if rng.random() < 0.5 else "M",
        "age": int(rng.integers(18, 91)),
        "thorax_half_width": _r(rng.uniform(*cfg.habitus)),
        "soft_tissue": _r(rng.uniform(0.7, 1.4)),
        "apex_y": _r(rng.uniform(-0.9, -0.78)),
        "dome_right_y": _r(dome_right),
        "dome_left_y": _r(dome_right + rng.uniform(0.0, 0.08)),
        "dome_curve": _r(rng.uniform(0.22, 0.32)),
        "ctr": _r(rng.uniform(*cfg.normal_ctr)),
        "heart_height": _r(rng.uniform(0.2, 0.26)),
        "heart_tilt": _r(rng.uniform(0.25, 0.5)),
        "mediastinum_half_width": _r(rng.uniform(0.11, 0.15)),
        "mediastinal_shift": 0.0,
        "rotation_deg": _r(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)),
        "shift": [_r(rng.uniform(-0.05, 0.05)), _r(rng.uniform(-0.04, 0.06))],
        "zoom": _r(rng.uniform(0.92, 1.06)),
        "rib_spacing": _r(rng.uniform(0.135, 0.17)),
        "exposure": _r(rng.uniform(0.85, 1.2)),
        "brightness": _r(rng.uniform(-0.06, 0.06)),
        "gamma": _r(rng.uniform(0.8, 1.25)),
        "noise": _r(rng.uniform(*cfg.noise_std)),
        "breast_shadows": False,
        "projection": "PA",
        "heart_magnification": _r(rng.uniform(0.95, 1.05)),
    }


def _sample_finding(name: str, rng: np.random.Generator, cfg: SynthConfig) -> FindingSpec:
    subtle = bool(rng.random() < cfg.subtle_fraction)
    severity = "mild" if subtle else _choice(rng, SEVERITIES, cfg.severity_weights)
    contrast = cfg.finding_contrast * (cfg.subtle_contrast if subtle else 1.0) * rng.uniform(0.85, 1.15)
    spec = FindingSpec(name=name, severity=severity, subtle=subtle, params={"contrast": _r(contrast)})
    if name == "pleural_effusion":
        spec.laterality = _choice(rng, ("right", "left", "bilateral"), (0.4, 0.3, 0.3))
        spec.zone = "lower"
    elif name == "pneumothorax":
        spec.laterality = _choice(rng, ("right", "left"), (0.5, 0.5))
        spec.zone = "upper" if severity == "mild" or rng.random() < 0.5 else None
    elif name == "atelectasis":
        spec.laterality = _choice(rng, ("right", "left", "bilateral"), (0.35, 0.35, 0.3))
        spec.zone = "lower" if spec.laterality == "bilateral" else _choice(
            rng, ("upper", "middle", "lower"), (0.1, 0.2, 0.7))
    elif name == "consolidation":
        spec.laterality = _choice(rng, ("right", "left", "bilateral"), (0.5, 0.4, 0.1))
        spec.zone = _choice(rng, ("upper", "middle", "lower"), (0.25, 0.25, 0.5))
        spec.params["air_bronchograms"] = bool(severity != "mild" and rng.random() < 0.5)
    elif name == "nodule":
        spec.laterality = _choice(rng, ("right", "left"), (0.5, 0.5))
        spec.zone = _choice(rng, ("upper", "middle", "lower"), (0.35, 0.35, 0.3))
        low, high = {"mild": (6, 10), "moderate": (11, 18), "severe": (19, 28)}[severity]
        spec.params["diameter_mm"] = int(rng.integers(low, high + 1))
    elif name == "edema":
        spec.laterality = "bilateral"
    elif name == "cardiomegaly":
        low, high = cfg.subtle_ctr if subtle else cfg.cardiomegaly_ctr[severity]
        spec.params["ctr"] = _r(rng.uniform(low, high))
    elif name == "support_devices":
        kinds = [k for k, p in (("ett", 0.4), ("central_line", 0.35), ("picc", 0.2), ("pacemaker", 0.25),
                                ("enteric_tube", 0.3)) if rng.random() < p]
        if not kinds:
            kinds = [_choice(rng, ("ett", "central_line", "pacemaker", "picc"), (0.3, 0.3, 0.2, 0.2))]
        spec.params["devices"] = kinds
        spec.params["device_sides"] = {
            "central_line": "right" if rng.random() < 0.7 else "left",
            "picc": "right" if rng.random() < 0.5 else "left",
            "pacemaker": "left" if rng.random() < 0.8 else "right",
        }
        spec.params["central_line_route"] = "jugular" if rng.random() < 0.6 else "subclavian"
        spec.params["contrast"] = _r(cfg.finding_contrast * rng.uniform(0.3, 0.9))  # faint lines are easy to miss
        spec.severity = "moderate"  # severity has no meaning for devices
        spec.subtle = False
    return spec


def sample_case(rng: np.random.Generator, config: SynthConfig | None = None, only: str | None = None) -> Case:
    """A random patient and findings; `only` forces exactly that one finding (the 5x200 set)."""
    cfg = config or SynthConfig()
    patient = _sample_patient(rng, cfg)
    patient["breast_shadows"] = bool(patient["sex"] == "F" and rng.random() < 0.8)
    draws = rng.random(len(FINDINGS))  # one draw per finding, used or not: a stable stream
    if only is not None:
        if only not in FINDINGS or only == "no_finding":
            raise ValueError(f"unknown finding {only!r}")
        present = [only]
    else:
        prevalence = dict(DEFAULT_PREVALENCE) | dict(cfg.prevalence)
        edema = draws[FINDINGS.index("edema")] < prevalence["edema"]
        present = []
        for i, name in enumerate(FINDINGS):
            if name == "no_finding":
                continue
            p = prevalence.get(name, 0.0)
            if edema and name in ("cardiomegaly", "pleural_effusion"):
                p = min(1.0, p + cfg.chf_boost)
            if draws[i] < p:
                present.append(name)
    findings = [_sample_finding(name, rng, cfg) for name in present]
    # portable AP films (more common with lines and tubes) magnify the heart: a real confounder of CTR
    if rng.random() < (0.7 if "support_devices" in present else 0.2):
        patient["projection"] = "AP"
        patient["heart_magnification"] = _r(rng.uniform(1.04, 1.16))
    for f in findings:  # findings that change the anatomy
        if f.name == "cardiomegaly":
            patient["ctr"] = f.params["ctr"]
        if f.name == "atelectasis" and f.severity != "mild" and f.laterality != "bilateral":
            lift = rng.uniform(0.04, 0.07) if f.severity == "moderate" else rng.uniform(0.08, 0.13)
            key = f"dome_{f.laterality}_y"
            patient[key] = _r(patient[key] - lift)
            if f.severity == "severe":
                patient["mediastinal_shift"] = _r(SIDE_SIGN[f.laterality] * rng.uniform(0.02, 0.045))
    return Case(patient=patient, findings=findings)


# ------------------------------------------------------------------------------ drawing primitives


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
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


def _ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 for d << 0, 1 for d >> 0, linear over `width`."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, width: float,
             angle: float = 0.0) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    r = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
    return _ramp((1.0 - r) * min(rx, ry), width)


def _polyline(x: np.ndarray, y: np.ndarray, points: Sequence[tuple[float, float]], half_width: float) -> np.ndarray:
    """Soft line along a polyline: exp(-(distance / half_width)^2)."""
    d2 = None
    for (ax, ay), (bx, by) in itertools.pairwise(points):
        vx, vy = bx - ax, by - ay
        t = np.clip(((x - ax) * vx + (y - ay) * vy) / max(vx * vx + vy * vy, 1e-9), 0.0, 1.0)
        seg = (x - ax - t * vx) ** 2 + (y - ay - t * vy) ** 2
        d2 = seg if d2 is None else np.minimum(d2, seg)
    return np.exp(-d2 / (half_width * half_width))


# ------------------------------------------------------------------------------ rendering


class _Anatomy:
    """Coordinates and masks of one patient, shared by the finding painters."""

    def __init__(self, p: dict[str, Any], size: int):
        theta = math.radians(p["rotation_deg"])
        gx, gy = _grid(size)
        c, s, z = math.cos(theta), math.sin(theta), p["zoom"]
        self.size = size
        self.x = ((c * gx + s * gy) / z - p["shift"][0]).astype(np.float32)
        self.y = ((-s * gx + c * gy) / z - p["shift"][1]).astype(np.float32)
        self.px = 2.0 / size  # one pixel in normalised units
        self.edge = max(1.5 * self.px, 0.025)  # soft anatomical borders
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
        self.central = np.zeros_like(self.x)  # heart + mediastinum, set by _draw_anatomy
        self.lung_nodome = {}
        self.lung = {}
        for side, sgn in SIDE_SIGN.items():
            region = (_ramp(self.half_width - np.abs(self.x), self.edge)
                      * _ramp(sgn * (self.x - self.mshift) - self.medial, self.edge)
                      * _ramp(self.y - self.top, self.edge))
            self.lung_nodome[side] = region
            self.lung[side] = region * _ramp(self.dome_y(side) - self.y, self.edge)

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


def _vessels(a: _Anatomy, rng: np.random.Generator) -> np.ndarray:
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


def _heart(a: _Anatomy, p: dict[str, Any]) -> tuple[np.ndarray, float]:
    """The heart (S, S): an ellipse sitting on the diaphragm whose horizontal extent gives the cardiothoracic
    ratio; and the row of its centre."""
    half = p["ctr"] * a.w * p.get("heart_magnification", 1.0)
    ry, tilt = p["heart_height"] + 0.1, 0.5 * p["heart_tilt"]
    rx = math.sqrt(max(half * half - (ry * math.sin(tilt)) ** 2, (0.6 * half) ** 2)) / math.cos(tilt)
    hx = a.mshift + 0.35 * half - 0.04
    hy = 0.5 * (a.dome["right"] + a.dome["left"]) + 0.02
    return _ellipse(a.x, a.y, hx, hy, rx, ry, 0.035, angle=-tilt), hy


def _draw_anatomy(a: _Anatomy, p: dict[str, Any], rng: np.random.Generator, bones: float = 1.0,
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
    body = _ramp(body_half - np.abs(x), 0.08)
    profile = np.sqrt(np.clip(1 - (x / (body_half + 0.05)) ** 2, 0, 1))
    atten = body * (0.4 + 0.05 * p["soft_tissue"] + 0.12 * profile)
    atten += 0.03 * smooth_noise(rng, size, 5) * body

    # diaphragm and abdomen (liver on the right, gastric air bubble under the left dome)
    dome = np.where(x < a.mshift, a.dome_y("right"), a.dome_y("left"))
    abdomen = _ramp(y - dome, a.edge) * body
    atten += abdomen * (0.15 + 0.05 * np.clip((y - dome) / 0.4, 0, 1))
    bubble = _ellipse(x, y, a.mshift + 0.42 * a.w, a.dome["left"] + 0.09, 0.1, 0.05, 0.03)
    atten -= 0.14 * bubble * abdomen

    heart, hy = _heart(a, p)
    # mediastinum (great vessels), aortic knob, hila
    mediastinum = _ramp(a.medial + 0.02 - ax, 0.04) * _ramp(hy - y, 0.1)
    knob = _ellipse(x, y, a.mshift + a.med0 + 0.03, -0.4, 0.075, 0.065, 0.03)
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
    trachea = _ramp(0.035 - np.abs(x - a.mshift * 0.5), 0.02) * _ramp(carina - y, 0.03)
    bronchi = _polyline(x, y, [(a.mshift - 0.14, carina + 0.13), (a.mshift, carina), (a.mshift + 0.15, carina + 0.15)],
                        0.025)
    atten -= 0.1 * np.maximum(trachea, bronchi) * (1.0 - air)

    # bones: spine, posterior and anterior ribs, clavicles
    spine = _ramp(0.06 - ax, 0.03) * body
    vertebrae = 0.8 + 0.2 * np.cos(2 * math.pi * (y - a.top) / 0.11)
    atten += bones * 0.035 * spine * vertebrae
    phase = (y - a.top - (-0.15 * ax + 0.6 * ax * ax)) / p["rib_spacing"]
    ribs = np.clip((np.cos(2 * math.pi * phase) - 0.35) * 2.5, 0.0, 1.0)
    cage = (_ramp(a.half_width + 0.06 - np.abs(x), a.edge) * _ramp(ax - 0.07, a.edge)
            * _ramp(y - a.top + 0.08, a.edge) * (1.0 - 0.7 * abdomen))
    phase_a = (y - a.top + 0.5 * ax) / (1.2 * p["rib_spacing"])
    anterior = np.clip((np.cos(2 * math.pi * phase_a + 1.3) - 0.5) * 2.0, 0.0, 1.0)
    rib_atten = cage * (0.065 * ribs + 0.025 * anterior * _ramp(ax - 0.25, 0.1))
    atten += bones * rib_atten
    clav_y = -0.74 + 0.05 * (a.top + 0.84) - 0.18 * (ax - 0.08) + 0.12 * (ax - 0.08) ** 2
    clavicle = _ramp(0.034 - np.abs(y - clav_y), 0.015) * _ramp(ax - 0.07, a.edge) * _ramp(0.75 - ax, a.edge)
    atten += bones * 0.09 * clavicle
    if layers is not None:
        layers["bone"] = (0.035 * spine * vertebrae + rib_atten + 0.09 * clavicle).astype(np.float32)

    if p["breast_shadows"]:
        for s in (-1.0, 1.0):
            breast = _ellipse(x, y, s * 0.6 * a.w + a.mshift, a.dome["right"] - 0.02, 0.42, 0.3, 0.1)
            atten += 0.06 * breast * _ramp(y - (a.dome["right"] - 0.25), 0.2)
    return atten, markings


def _paint_findings(a: _Anatomy, case: Case, atten: np.ndarray, markings: np.ndarray,
                    rng: np.random.Generator, masks: dict[str, np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Add each finding of `case` to the attenuation; `masks` (when given) receives, for the findings of
    `MASK_FINDINGS`, bool (S, S) maps where the finding's opacity or lucency is at least half its full strength."""
    x, y, size = a.x, a.y, a.size

    def outline(name: str, field: np.ndarray, level: float = 0.5) -> None:
        if masks is not None:
            masks[name] = masks.get(name, np.zeros(field.shape, bool)) | (field >= level)

    lungs = a.lung["right"] + a.lung["left"]
    line_w = max(0.01, 0.9 * a.px)
    for f in case.findings:
        c = f.params.get("contrast", 1.0)
        sev = SEVERITIES.index(f.severity)  # 0, 1, 2
        sides = ["right", "left"] if f.laterality == "bilateral" else [f.laterality] if f.laterality else []

        if f.name == "pleural_effusion":
            for side in sides:
                sgn = SIDE_SIGN[side]
                costophrenic = a.dome[side] + a.curve
                height = (rng.uniform(0.08, 0.16), rng.uniform(0.28, 0.42), rng.uniform(0.55, 0.85))[sev]
                meniscus = rng.uniform(0.12, 0.25)
                rel = np.clip(sgn * (x - a.mshift) / a.w, 0.0, 1.2)  # 0 medial .. 1 lateral wall
                surface = costophrenic - height + meniscus * (1.0 - rel**2)
                region = a.lung_nodome[side] * _ramp(a.dome_y(side) - y, 0.06)
                fluid = _ramp(y - surface, 0.05) * region * (1.0 - 0.9 * a.central)
                atten += 0.34 * c * fluid * (0.85 + 0.15 * np.clip((y - surface) / 0.3, 0, 1))
                outline("pleural_effusion", fluid)
                markings *= 1.0 - fluid

        elif f.name == "pneumothorax":
            side = sides[0]
            depth = (rng.uniform(0.035, 0.06), rng.uniform(0.08, 0.14), rng.uniform(0.18, 0.3))[sev]
            extent = 0.45 if f.zone == "upper" else 1.6
            dist = np.minimum(a.half_width - np.abs(x), (y - a.top) * 0.8)
            limit = _ramp(a.top + extent - y, 0.15)
            rim = _ramp(depth - dist, a.px) * a.lung[side] * limit
            pleura = np.exp(-(((dist - depth) / (0.8 * line_w)) ** 2)) * a.lung[side] * limit
            atten -= 0.06 * c * rim
            outline("pneumothorax", rim)
            atten += 0.16 * c * pleura * (1 - rim) + 0.04 * (1 + sev) * c * a.lung[side] * (1 - rim)
            markings *= 1.0 - rim

        elif f.name == "consolidation":
            for side in sides:
                cx, cy = a.zone_point(rng, side, f.zone, (0.2, 0.75))
                sx = (rng.uniform(0.08, 0.11), rng.uniform(0.12, 0.17), rng.uniform(0.17, 0.24))[sev]
                sy = sx * rng.uniform(0.8, 1.4)
                blob = np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
                patchy = np.clip(0.55 + 0.6 * smooth_noise(rng, size, 10), 0.0, 1.0)
                patch = np.clip(blob * 1.4 - 0.2, 0.0, 1.0) * patchy * a.lung[side]
                dens = (0.29, 0.39, 0.48)[sev] * c
                if f.params.get("air_bronchograms"):
                    bronch = np.clip(1.0 - np.abs(smooth_noise(rng, size, 12)) * 3.0, 0.0, 1.0) ** 2
                    patch = patch * (1.0 - 0.45 * bronch * (blob > 0.4))
                atten += dens * patch
                outline("consolidation", patch, 0.25)  # patchy: a quarter of full density still reads as opacity

        elif f.name == "atelectasis":
            for side in sides:
                if f.severity == "severe" and f.laterality != "bilateral":
                    sgn = SIDE_SIGN[side]
                    if f.zone == "upper":
                        span = np.clip((a.top + 0.45 - y) / 0.45, 0.0, 1.0)
                    else:
                        span = np.clip(1.0 - (a.dome[side] + 0.1 - y) / 0.5, 0.0, 1.0)
                    wedge = _ramp(a.medial + 0.3 * span - sgn * (x - a.mshift), a.edge) * a.lung[side] * (span > 0)
                    atten += 0.3 * c * wedge
                    continue
                for _ in range(1 if sev == 0 else 2):
                    cx, cy = a.zone_point(rng, side, f.zone, (0.2, 0.7))
                    length = rng.uniform(0.1, 0.22) * (1 + 0.3 * sev)
                    angle = rng.uniform(-0.35, 0.35) + SIDE_SIGN[side] * 0.15
                    dx, dy = length * math.cos(angle), length * math.sin(angle)
                    thick = (rng.uniform(0.012, 0.018), rng.uniform(0.02, 0.03), rng.uniform(0.03, 0.04))[sev]
                    plate = _polyline(x, y, [(cx - dx, cy - dy), (cx + dx, cy + dy)], max(thick, line_w))
                    atten += (0.2 + 0.05 * sev) * c * plate * a.lung[side]

        elif f.name == "edema":
            sx = (0.18, 0.24, 0.3)[sev]
            haze = np.exp(-0.5 * (((a.ax - a.med0 - 0.12) / sx) ** 2 + ((y + 0.02) / 0.32) ** 2))
            patchy = 1.0 if sev < 2 else np.clip(0.7 + 0.5 * smooth_noise(rng, size, 8), 0.0, 1.2)
            atten += (0.06, 0.1, 0.18)[sev] * c * haze * patchy * lungs
            markings *= 1.0 + (0.5, 0.9, 1.3)[sev] * c
            near_wall = _ramp(0.1 - (a.half_width - np.abs(x)), 0.03)
            bases = _ramp(y - (max(a.dome.values()) - 0.35), 0.1)
            kerley = np.clip((np.cos(2 * math.pi * y / 0.045) - 0.7) / 0.3, 0.0, 1.0)
            atten += (0.03, 0.05, 0.06)[sev] * c * kerley * near_wall * bases * lungs

        elif f.name == "nodule":
            side = sides[0]
            cx, cy = a.zone_point(rng, side, f.zone, (0.2, 0.85))
            radius = f.params.get("diameter_mm", 10) / 200.0
            dist = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
            disc = _ramp(radius - dist, max(a.px, 0.3 * radius))
            atten += 0.3 * c * disc * a.lung[side]
            outline("nodule", disc * a.lung[side])

        elif f.name == "support_devices":
            atten = _paint_devices(a, case, f, atten, line_w)
    return atten, markings


def _paint_devices(a: _Anatomy, case: Case, f: FindingSpec, atten: np.ndarray, line_w: float) -> np.ndarray:
    x, y, m = a.x, a.y, a.mshift
    c = f.params.get("contrast", 1.0)
    sides = f.params.get("device_sides", {})
    svc = (m - 0.07, -0.12)
    for kind in f.params.get("devices", []):
        if kind == "ett":
            atten = atten + 0.2 * c * _polyline(x, y, [(m, -1.1), (m + 0.005, -0.52)], 1.4 * line_w)
        elif kind == "central_line":
            s = SIDE_SIGN[sides.get("central_line", "right")]
            if f.params.get("central_line_route") == "subclavian":
                pts = [(m + s * 0.8, -0.82), (m + s * 0.4, -0.74), (m + s * 0.12, -0.6), (svc[0], -0.35), svc]
            else:
                pts = [(m + s * 0.25, -1.1), (m + s * 0.15, -0.75), (m + s * 0.08, -0.5), (svc[0], -0.3), svc]
            atten = atten + 0.18 * c * _polyline(x, y, pts, line_w)
        elif kind == "picc":
            s = SIDE_SIGN[sides.get("picc", "right")]
            pts = [(m + s * 1.1, -0.5), (m + s * 0.85, -0.7), (m + s * 0.4, -0.76), (m + s * 0.12, -0.6), svc]
            atten = atten + 0.16 * c * _polyline(x, y, pts, line_w)
        elif kind == "pacemaker":
            s = SIDE_SIGN[sides.get("pacemaker", "left")]
            bx, by = m + s * 0.58 * a.w, -0.62
            box = _ramp(0.075 - np.abs(x - bx), a.px) * _ramp(0.05 - np.abs(y - by), a.px)
            atten = atten + 0.4 * c * box
            apex = (m + 0.25 * case.patient["ctr"] * a.w + 0.1, 0.5 * (a.dome["right"] + a.dome["left"]))
            for tip in ((m - 0.12, -0.02), apex):
                pts = [(bx - s * 0.05, by), (m + s * 0.1, -0.72), (m - 0.05, -0.45), (m - 0.08, -0.15), tip]
                atten = atten + 0.2 * c * _polyline(x, y, pts, line_w)
        elif kind == "enteric_tube":
            pts = [(m + 0.01, -1.1), (m + 0.02, -0.3), (m + 0.05, a.dome["left"] - 0.05),
                   (m + 0.3 * a.w, a.dome["left"] + 0.15), (m + 0.45 * a.w, a.dome["left"] + 0.2)]
            atten = atten + 0.16 * c * _polyline(x, y, pts, line_w)
    return atten


IMAGE_KINDS = ("radiograph", "soft_tissue", "bone")  # what `render` draws from one phantom
MASK_FINDINGS = ("heart", "pleural_effusion", "pneumothorax", "consolidation", "nodule")  # segment targets


def render(case: Case, size: int, rng: np.random.Generator, kind: str = "radiograph",
           masks: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The film of `case` as float32 (size, size) in [0, 1].

    Args:
        kind: "radiograph" (the ordinary film); "soft_tissue" (bone-suppressed: the same film without the
            spine, ribs and clavicles, identical to the radiograph wherever no bone term reaches, noise
            included); "bone" (a dual-energy bone image: the bone attenuation alone, under the same exposure,
            gamma and quantum noise, on a dark background).
        masks: when given, receives bool (S, S) maps of `MASK_FINDINGS`: "heart" and "lungs" always, each
            present finding of the others, and "bone_region" (where a bone term is non-zero).
    """
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image kind {kind!r}: use one of {IMAGE_KINDS}")
    p = case.patient
    noise_rng = np.random.default_rng(int(rng.integers(2**62)))  # same noise with or without findings
    a = _Anatomy(p, size)
    layers: dict[str, np.ndarray] = {}
    atten, markings = _draw_anatomy(a, p, rng, bones=0.0 if kind == "soft_tissue" else 1.0, layers=layers)
    atten, markings = _paint_findings(a, case, atten, markings, rng, masks)
    lungs = a.lung["right"] + a.lung["left"]
    atten = atten + 0.1 * markings * lungs
    if masks is not None:
        masks["heart"] = _heart(a, p)[0] >= 0.5
        masks["lungs"] = lungs >= 0.5
        masks["bone_region"] = layers["bone"] > 0
    # exposure, contrast, quantum noise and a faint large-scale non-uniformity
    if kind == "bone":
        img = 0.05 + 6.0 * layers["bone"] * p["exposure"]
    else:
        img = (atten - 0.35) * p["exposure"] + 0.42 + p["brightness"]
    img += 0.02 * smooth_noise(noise_rng, size, 3)
    img = np.clip(img, 0.0, 1.0) ** p["gamma"]
    img += p["noise"] * noise_rng.standard_normal((size, size)).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------ samples and datasets


def _rngs(seed: int, stream: int, index: int) -> list[np.random.Generator]:
    """Independent generators for the case, the picture and the report of one image."""
    children = np.random.SeedSequence(entropy=seed, spawn_key=(stream, index)).spawn(3)
    return [np.random.default_rng(s) for s in children]


def _split(index: int, fractions: tuple[float, float, float]) -> str:
    u = ((index * 7) % 10 + 0.5) / 10.0  # each block of 10 consecutive images splits 8/1/1 exactly
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def eval_finding(index: int, per_class: int) -> str:
    """The competition finding of image `index` in the 5x200 set (blocks of `per_class`)."""
    return COMPETITION_FINDINGS[index // per_class]


def generate_sample(seed: int, index: int, size: int = 128, config: SynthConfig | None = None,
                    stream: int = MAIN_STREAM, only: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One image (uint8, (size, size)) and its manifest record (without the image path)."""
    cfg = config or SynthConfig()
    case_rng, image_rng, text_rng = _rngs(seed, stream, index)
    case = sample_case(case_rng, cfg, only=only)
    image = render(case, size, image_rng)
    findings, impression = write_report(case.findings, text_rng, mention_absent=cfg.mention_absent)
    prefix = "synthcxr" if stream == MAIN_STREAM else "synthcxr5x200"
    record = {
        "id": f"{prefix}-{index:06d}",
        "text": report_text(findings, impression),
        "findings": findings,
        "impression": impression,
        "labels": case.labels(),
        "split": "test" if stream == EVAL_STREAM else _split(index, cfg.split_fractions),
        "modality": "cxr",
        "task": "report",
        "source": "synthcxr",
        "finding_details": [f.to_json() for f in case.findings],
        "patient": case.patient,
        "seed": seed,
        "index": index,
    }
    return (image * 255.0 + 0.5).astype(np.uint8), record


# ------------------------------------------------------------------------------ counterfactual pairs


@dataclass
class CounterfactualPair:
    """One patient without and with one added finding, the records of both images and of the edit.

    `region` (bool (S, S)) is where the added finding can change pixels (the support of its painter: the
    lung(s) of its side, both lungs for edema, the old and new heart for cardiomegaly); outside it the two
    images are identical. Records carry no paths: `write_synthcxr` fills `image` / `target_image`.
    """

    source_image: np.ndarray  # uint8 (S, S)
    target_image: np.ndarray  # uint8 (S, S)
    region: np.ndarray  # bool (S, S)
    added: FindingSpec
    source_record: dict[str, Any]
    target_record: dict[str, Any]
    edit_record: dict[str, Any]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def edit_instruction(spec: FindingSpec, rng: np.random.Generator) -> str:
    """A natural instruction that adds `spec`: "add a moderate left pleural effusion", "introduce mild
    cardiomegaly", "show patchy consolidation in the right lower lobe". It always names the finding."""
    verb = _pick(rng, ("add", "introduce", "show"))
    side, sev = spec.laterality, spec.severity
    if spec.name == "pleural_effusion":
        size = _pick(rng, SIZE_WORDS[sev])
        phrase = f"{size} bilateral pleural effusions" if side == "bilateral" else f"a {size} {side} pleural effusion"
    elif spec.name == "pneumothorax":
        phrase = f"a {_pick(rng, SIZE_WORDS[sev])} {side}{' apical' if spec.zone == 'upper' else ''} pneumothorax"
    elif spec.name == "cardiomegaly":
        phrase = f"{_pick(rng, DEGREE_WORDS[sev])} cardiomegaly"
    elif spec.name == "edema":
        phrase = f"{_pick(rng, DEGREE_WORDS[sev])} pulmonary edema"
    elif spec.name == "consolidation":
        quality = {"mild": "patchy", "moderate": "focal", "severe": "dense"}[sev]
        phrase = f"{quality} consolidation in {_location_noun(side, spec.zone, rng)}"
    elif spec.name == "atelectasis":
        quality = {"mild": "subsegmental", "moderate": "plate-like", "severe": "extensive"}[sev]
        phrase = f"{quality} atelectasis in {_location_noun(side, spec.zone, rng)}"
    else:
        raise ValueError(f"no edit instruction for {spec.name!r} (pairs add one of {PAIR_FINDINGS})")
    return f"{verb} {phrase}"


def sample_pair(rng: np.random.Generator, config: SynthConfig | None = None) -> tuple[Case, Case, FindingSpec]:
    """(source, target, added): a random case and the same case with one more finding of `PAIR_FINDINGS`.

    The target keeps the source's patient parameters except what the finding itself is (a cardiomegaly
    sets the heart's CTR). The added finding is painted last, so the renderer draws everything else
    identically. Two things keep the edit local: added atelectasis is at most moderate and has no volume
    loss (a raised hemidiaphragm reshapes both lung outlines), and cardiomegaly is never added to a film
    with a pacemaker (its lead runs to the cardiac apex).
    """
    cfg = config or SynthConfig()
    while True:  # a case that already has every pair finding is redrawn (it practically never happens)
        source = sample_case(rng, cfg)
        present = {f.name for f in source.findings}
        devices = next((f.params.get("devices", []) for f in source.findings if f.name == "support_devices"), [])
        candidates = [n for n in PAIR_FINDINGS if n not in present
                      and not (n == "cardiomegaly" and "pacemaker" in devices)]
        if candidates:
            break
    name = candidates[int(rng.integers(len(candidates)))]
    added = _sample_finding(name, rng, cfg)
    if name == "atelectasis" and added.severity == "severe":
        added.severity = "moderate"
    patient = dict(source.patient)
    if name == "cardiomegaly":
        patient["ctr"] = added.params["ctr"]
    return source, Case(patient=patient, findings=[*source.findings, added]), added


def finding_region(source: Case, target: Case, added: FindingSpec, size: int) -> np.ndarray:
    """bool (S, S): the pixels where adding `added` to `source` (giving `target`) can change the image."""
    a = _Anatomy(target.patient, size)
    if added.name == "cardiomegaly":  # the heart grows: the old and the new silhouette
        return (_heart(a, source.patient)[0] > 0) | (_heart(a, target.patient)[0] > 0)
    sides = ["right", "left"] if added.laterality in ("bilateral", None) else [added.laterality]
    return np.logical_or.reduce([a.lung_nodome[side] > 0 for side in sides])


def generate_pair(seed: int, index: int, size: int = 128, config: SynthConfig | None = None) -> CounterfactualPair:
    """Pair `index` of stream `PAIR_STREAM`: the same patient, noise seed and findings rendered without and
    with one added finding, each with its own report and labels, and the edit record that links them."""
    cfg = config or SynthConfig()
    case_seq, image_seq, source_text_seq, target_text_seq, edit_seq = np.random.SeedSequence(
        entropy=seed, spawn_key=(PAIR_STREAM, index)).spawn(5)
    source, target, added = sample_pair(np.random.default_rng(case_seq), cfg)
    # the same picture stream for both renders: identical anatomy, noise and earlier findings
    images = [render(case, size, np.random.default_rng(image_seq)) for case in (source, target)]
    pair_id = f"synthcxr-pair-{index:06d}"
    split = _split(index, cfg.split_fractions)
    records = []
    for case, text_seq, role in ((source, source_text_seq, "source"), (target, target_text_seq, "target")):
        findings, impression = write_report(case.findings, np.random.default_rng(text_seq),
                                            mention_absent=cfg.mention_absent)
        records.append({
            "id": f"{pair_id}-{role}", "text": report_text(findings, impression), "findings": findings,
            "impression": impression, "labels": case.labels(), "split": split, "modality": "cxr",
            "task": "report", "source": "synthcxr", "pair_id": pair_id,
            "finding_details": [f.to_json() for f in case.findings], "patient": case.patient,
            "seed": seed, "index": index,
        })
    source_record, target_record = records
    edit_record = {
        **{k: target_record[k] for k in ("text", "findings", "impression", "labels", "split", "modality", "source")},
        "id": f"{pair_id}-edit", "task": "edit", "pair_id": pair_id,
        "instruction": edit_instruction(added, np.random.default_rng(edit_seq)),
        "source_text": source_record["text"], "source_labels": source_record["labels"],
        "edit_finding": added.to_json(), "seed": seed, "index": index,
    }
    region = finding_region(source, target, added, size)
    source_u8, target_u8 = ((im * 255.0 + 0.5).astype(np.uint8) for im in images)
    return CounterfactualPair(source_u8, target_u8, region, added, source_record, target_record, edit_record)


def synthesize_pairs(n: int, size: int = 64, seed: int = 0, config: SynthConfig | None = None
                     ) -> list[CounterfactualPair]:
    """In-memory counterfactual pairs 0..n-1 (no files written)."""
    return [generate_pair(seed, i, size, config) for i in range(n)]


# ------------------------------------------------------------------------------ image-to-image pairs

I2I_SCALES = (2, 4)  # low-resolution factors of the upscale pairs
I2I_TRANSLATIONS = {"soft_tissue": ("translate to a bone-suppressed image", "suppress the bones",
                                    "show the soft tissue only"),
                    "bone": ("translate to a dual-energy bone image", "show the bones only", "make a bone image")}
LOWRES_NOISE = 0.01  # std of the detector noise added to a low-resolution image (on the [0, 1] scale)
# The segmented findings are uncommon in the main set; the image-to-image stream draws them more often so
# that every mask finding has positives to learn from (the other prevalences stay the default).
I2I_PREVALENCE = {"pleural_effusion": 0.3, "pneumothorax": 0.15}
MASK_NAMES = {"heart": "the heart", "pleural_effusion": "the pleural effusion", "pneumothorax": "the pneumothorax",
              "consolidation": "the consolidation", "nodule": "the nodule"}


@dataclass
class I2ISample:
    """One phantom rendered every way the image-to-image tasks need (uint8 (S, S) images unless noted).

    `images` holds the IMAGE_KINDS; `lowres[k]` is the radiograph at S // k (antialiased downsample plus
    `LOWRES_NOISE`); `masks` the bool (S, S) outlines of the mask findings present ("heart" always), plus
    "lungs" and "bone_region" (where the soft-tissue image may differ from the radiograph).
    """

    images: dict[str, np.ndarray]
    lowres: dict[int, np.ndarray]
    masks: dict[str, np.ndarray]
    case: Case
    record: dict[str, Any]  # the radiograph's report record (no image path)


def i2i_config(config: SynthConfig | None = None) -> SynthConfig:
    """The config of the image-to-image stream: `config` with the mask findings at `I2I_PREVALENCE`."""
    cfg = config or SynthConfig()
    return SynthConfig(**{**asdict(cfg), "prevalence": {**cfg.prevalence, **I2I_PREVALENCE}})


def generate_i2i(seed: int, index: int, size: int = 64, config: SynthConfig | None = None) -> I2ISample:
    """Phantom `index` of `I2I_STREAM`: its radiograph, soft-tissue and bone images (one picture stream, so
    they agree pixel for pixel outside the bones), low-resolution copies and finding masks."""
    cfg = i2i_config(config)
    case_seq, image_seq, text_seq, lowres_seq = np.random.SeedSequence(
        entropy=seed, spawn_key=(I2I_STREAM, index)).spawn(4)
    case = sample_case(np.random.default_rng(case_seq), cfg)
    masks: dict[str, np.ndarray] = {}
    floats = {kind: render(case, size, np.random.default_rng(image_seq), kind, masks if kind == "radiograph" else None)
              for kind in IMAGE_KINDS}
    lowres_rng = np.random.default_rng(lowres_seq)
    lowres = {}
    for k in I2I_SCALES:
        small = resize_array(floats["radiograph"], size // k)
        small = small + LOWRES_NOISE * lowres_rng.standard_normal(small.shape).astype(np.float32)
        lowres[k] = (np.clip(small, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    findings, impression = write_report(case.findings, np.random.default_rng(text_seq),
                                        mention_absent=cfg.mention_absent)
    record = {
        "text": report_text(findings, impression), "findings": findings, "impression": impression,
        "labels": case.labels(), "split": _split(index, cfg.split_fractions), "modality": "cxr",
        "source": "synthcxr", "finding_details": [f.to_json() for f in case.findings], "seed": seed, "index": index,
    }
    images = {kind: (im * 255.0 + 0.5).astype(np.uint8) for kind, im in floats.items()}
    return I2ISample(images, lowres, masks, case, record)


def i2i_records(sample: I2ISample, paths: dict[str, str]) -> list[dict[str, Any]]:
    """The translate, upscale and segment records of one phantom, with image paths from `paths` (keys
    "radiograph", "soft_tissue", "bone", "x2", "x4", "mask_<finding>")."""
    index = sample.record["index"]
    rng = np.random.default_rng([sample.record["seed"], index, I2I_STREAM])  # instruction phrasing only
    base = dict(sample.record)
    prefix = f"synthcxr-i2i-{index:06d}"
    out = []
    for kind, phrasings in I2I_TRANSLATIONS.items():
        out.append({**base, "id": f"{prefix}-{kind}", "task": "translate", "image": paths["radiograph"],
                    "target_image": paths[kind], "instruction": _pick(rng, phrasings), "target_kind": kind})
    for k in I2I_SCALES:
        phrase = _pick(rng, (f"upscale x{k}", f"increase the resolution {k}x", f"super-resolve by {k}"))
        out.append({**base, "id": f"{prefix}-x{k}", "task": "upscale", "image": paths[f"x{k}"],
                    "target_image": paths["radiograph"], "instruction": phrase, "scale": k})
    for name in MASK_FINDINGS:
        if name in sample.masks:
            verb = _pick(rng, ("outline", "segment", "mark"))
            out.append({**base, "id": f"{prefix}-mask-{name}", "task": "segment", "image": paths["radiograph"],
                        "mask": paths[f"mask_{name}"], "instruction": f"{verb} {MASK_NAMES[name]}",
                        "mask_finding": name})
    return out


def _i2i_job(out: str, folder: str, seed: int, size: int, cfg: SynthConfig, start: int, end: int
             ) -> list[dict[str, Any]]:
    """Worker: write phantoms [start, end) of the image-to-image stream (images, low-res copies, masks)."""
    records = []
    for index in range(start, end):
        sample = generate_i2i(seed, index, size, cfg)
        paths = {kind: f"{folder}/{index:06d}_{kind}.png" for kind in IMAGE_KINDS}
        paths |= {f"x{k}": f"{folder}/{index:06d}_x{k}.png" for k in I2I_SCALES}
        paths |= {f"mask_{n}": f"{folder}/{index:06d}_mask_{n}.png" for n in MASK_FINDINGS if n in sample.masks}
        for kind in IMAGE_KINDS:
            save_png(sample.images[kind], Path(out) / paths[kind])
        for k in I2I_SCALES:
            save_png(sample.lowres[k], Path(out) / paths[f"x{k}"])
        for name in MASK_FINDINGS:
            if name in sample.masks:
                save_png(sample.masks[name].astype(np.uint8) * 255, Path(out) / paths[f"mask_{name}"])
        records += i2i_records(sample, paths)
    return records


def _pair_job(out: str, folder: str, seed: int, size: int, cfg: SynthConfig, start: int, end: int
              ) -> list[dict[str, Any]]:
    """Worker: write pairs [start, end) (source, target and region PNGs); their three records each."""
    records = []
    for index in range(start, end):
        pair = generate_pair(seed, index, size, cfg)
        paths = {k: f"{folder}/{index:06d}_{k}.png" for k in ("source", "target", "region")}
        save_png(pair.source_image, Path(out) / paths["source"])
        save_png(pair.target_image, Path(out) / paths["target"])
        save_png(pair.region.astype(np.uint8) * 255, Path(out) / paths["region"])
        pair.source_record["image"] = paths["source"]
        pair.target_record["image"] = paths["target"]
        pair.edit_record.update(image=paths["source"], target_image=paths["target"], edit_region=paths["region"])
        records += [pair.source_record, pair.target_record, pair.edit_record]
    return records


def _chunk_job(job: tuple) -> list[dict[str, Any]]:
    """Worker: generate images [start, end) of a stream, write their PNGs, return the records."""
    out, folder, seed, size, cfg, stream, start, end, per_class = job
    if stream == PAIR_STREAM:
        return _pair_job(out, folder, seed, size, cfg, start, end)
    if stream == I2I_STREAM:
        return _i2i_job(out, folder, seed, size, cfg, start, end)
    records = []
    for index in range(start, end):
        only = eval_finding(index, per_class) if stream == EVAL_STREAM else None
        image, record = generate_sample(seed, index, size, cfg, stream=stream, only=only)
        relative = f"{folder}/{index:06d}.png"
        save_png(image, Path(out) / relative)
        record["image"] = relative
        records.append(record)
    return records


def _chunk_arrays(job: tuple) -> tuple[np.ndarray, list[dict[str, Any]]]:
    seed, size, cfg, stream, start, end, per_class = job
    images, records = [], []
    for index in range(start, end):
        only = eval_finding(index, per_class) if stream == EVAL_STREAM else None
        image, record = generate_sample(seed, index, size, cfg, stream=stream, only=only)
        images.append(image)
        records.append(record)
    return np.stack(images) if images else np.zeros((0, size, size), np.uint8), records


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    step = max(1, min(256, math.ceil(n / max(1, 4 * workers))))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _map(fn, jobs: list[tuple], workers: int) -> list:
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    with get_context().Pool(min(workers, len(jobs))) as pool:
        return list(pool.imap(fn, jobs))


def synthesize(n: int, size: int = 64, seed: int = 0, config: SynthConfig | None = None, workers: int = 1,
               stream: int = MAIN_STREAM, per_class: int = 200) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """In-memory SynthCXR: uint8 images (n, size, size) and their records (no files written).

    With `stream=EVAL_STREAM`, n should be 5 * per_class (the 5x200 construction).
    """
    cfg = config or SynthConfig()
    jobs = [(seed, size, cfg, stream, s, e, per_class) for s, e in _chunks(n, workers)]
    parts = _map(_chunk_arrays, jobs, workers)
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, size, size), np.uint8)
    return images, [r for p in parts for r in p[1]]


def write_synthcxr(out: str | Path, n: int, size: int = 128, seed: int = 0, workers: int | None = None,
                   config: SynthConfig | None = None, per_class_5x200: int = 200, pairs: int = 0,
                   i2i: int = 0) -> dict[str, Any]:
    """Write SynthCXR to `out`: images/, manifest.jsonl, images_5x200/, manifest_5x200.jsonl, synthcxr.json.

    With `pairs` > 0, images_pairs/ holds that many counterfactual pairs (`generate_pair`: source, target
    and the region PNG) and manifest.jsonl gains three records per pair after the main set: the source and
    the target as ordinary "report" records, and an "edit" record (image = source, target_image = target,
    text = the target's report, instruction, pair_id, edit_region). A pair's records share its split.

    With `i2i` > 0, images_i2i/ holds that many image-to-image phantoms (`generate_i2i`: radiograph,
    soft-tissue and bone images, x2 and x4 low-resolution copies, finding masks) and manifest.jsonl gains
    their "translate" (radiograph -> soft_tissue / bone), "upscale" (x2 / x4 -> radiograph) and "segment"
    (radiograph -> the mask of "heart" and of each present mask finding) records, each with an instruction.
    Returns a summary (counts, prevalence). The same arguments give byte-identical files whatever
    `workers` is.
    """
    if n < 0 or per_class_5x200 < 0 or pairs < 0 or i2i < 0 or size < 16:
        raise ValueError("n, per_class_5x200, pairs and i2i must be >= 0 and size >= 16")
    if i2i and size % max(I2I_SCALES):
        raise ValueError(f"image-to-image pairs need a size divisible by {max(I2I_SCALES)} (the x4 low-res copy), "
                         f"got {size}")
    cfg = config or SynthConfig()
    workers = workers or os.cpu_count() or 1
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_eval = len(COMPETITION_FINDINGS) * per_class_5x200
    jobs = [(str(out), "images", seed, size, cfg, MAIN_STREAM, s, e, 1) for s, e in _chunks(n, workers)]
    jobs += [(str(out), "images_5x200", seed, size, cfg, EVAL_STREAM, s, e, per_class_5x200)
             for s, e in _chunks(n_eval, workers)]
    jobs += [(str(out), "images_pairs", seed, size, cfg, PAIR_STREAM, s, e, 1) for s, e in _chunks(pairs, workers)]
    jobs += [(str(out), "images_i2i", seed, size, cfg, I2I_STREAM, s, e, 1) for s, e in _chunks(i2i, workers)]
    if n_eval:
        (out / "images_5x200").mkdir(parents=True, exist_ok=True)
    parts = _map(_chunk_job, jobs, workers)
    by_stream: dict[int, list[dict[str, Any]]] = {MAIN_STREAM: [], EVAL_STREAM: [], PAIR_STREAM: [], I2I_STREAM: []}
    for job, part in zip(jobs, parts):
        by_stream[job[5]] += part
    main, evals, pair_records = by_stream[MAIN_STREAM], by_stream[EVAL_STREAM], by_stream[PAIR_STREAM]
    write_manifest(main + pair_records + by_stream[I2I_STREAM], out / "manifest.jsonl")
    if n_eval:
        write_manifest(evals, out / "manifest_5x200.jsonl")
    summary = {
        "generator": "synthcxr",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": size,
        "n": n,
        "per_class_5x200": per_class_5x200,
        "splits": {s: sum(r["split"] == s for r in main) for s in ("train", "val", "test")},
        "prevalence": {name: _r(np.mean([r["labels"][name] for r in main])) if main else 0.0 for name in FINDINGS},
        "pairs": pairs,
        "pair_findings": {name: sum(r["edit_finding"]["name"] == name for r in pair_records if r["task"] == "edit")
                          for name in PAIR_FINDINGS},
        "i2i": i2i,
        "i2i_tasks": {task: sum(r["task"] == task for r in by_stream[I2I_STREAM])
                      for task in ("translate", "upscale", "segment")},
        "config": cfg.to_json(),
    }
    (out / "synthcxr.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
