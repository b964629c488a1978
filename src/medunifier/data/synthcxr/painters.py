"""The finding painters of SynthCXR: one small function a finding, looked up by name in `PAINTERS`.

A painter adds its finding to a `Canvas` (the attenuation and the lung-marking map of one film, and the
optional mask outlines) in place, drawing its random choices from the picture stream in a fixed order, so
the same case and stream always paint the same pixels. Support devices are painted by kind through
`DEVICE_PAINTERS` in the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medunifier.data.reports import SEVERITIES, FindingSpec
from medunifier.data.synthcxr.anatomy import Anatomy
from medunifier.data.synthcxr.primitives import polyline, ramp, smooth_noise
from medunifier.data.synthcxr.sampling import SIDE_SIGN, Case

__all__ = ["DEVICE_PAINTERS", "PAINTERS", "Canvas", "Painter", "paint_findings"]


@dataclass
class Canvas:
    """What the painters draw on.

    Args:
        atten: the attenuation (S, S) of the film.
        markings: the lung-marking map (S, S); fluid and air hide markings, edema thickens them.
        masks: when given, receives bool (S, S) outlines of the mask findings (see `outline`).
    """

    atten: np.ndarray
    markings: np.ndarray
    masks: dict[str, np.ndarray] | None = None

    def outline(self, name: str, field: np.ndarray, level: float = 0.5) -> None:
        """Add the pixels where `field` reaches `level` (of its full strength 1) to the mask `name`."""
        if self.masks is not None:
            self.masks[name] = self.masks.get(name, np.zeros(field.shape, bool)) | (field >= level)


Painter = Callable[[Anatomy, Case, FindingSpec, Canvas, np.random.Generator], None]


def _contrast(f: FindingSpec) -> float:
    return f.params.get("contrast", 1.0)


def _severity(f: FindingSpec) -> int:
    """0, 1 or 2 for mild, moderate or severe."""
    return SEVERITIES.index(f.severity)


def _sides(f: FindingSpec) -> list[str]:
    """The patient sides a finding is on: both for "bilateral", none when it has no laterality."""
    return ["right", "left"] if f.laterality == "bilateral" else [f.laterality] if f.laterality else []


def _paint_effusion(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas, rng: np.random.Generator) -> None:
    """Fluid filling the costophrenic angle up to a lateral meniscus, hiding the dome and the markings."""
    c, sev, x, y = _contrast(f), _severity(f), a.x, a.y
    for side in _sides(f):
        sgn = SIDE_SIGN[side]
        costophrenic = a.dome[side] + a.curve
        height = (rng.uniform(0.08, 0.16), rng.uniform(0.28, 0.42), rng.uniform(0.55, 0.85))[sev]
        meniscus = rng.uniform(0.12, 0.25)
        rel = np.clip(sgn * (x - a.mshift) / a.w, 0.0, 1.2)  # 0 medial .. 1 lateral wall
        surface = costophrenic - height + meniscus * (1.0 - rel**2)
        region = a.lung_nodome[side] * ramp(a.dome_y(side) - y, 0.06)
        fluid = ramp(y - surface, 0.05) * region * (1.0 - 0.9 * a.central)
        canvas.atten += 0.34 * c * fluid * (0.85 + 0.15 * np.clip((y - surface) / 0.3, 0, 1))
        canvas.outline("pleural_effusion", fluid)
        canvas.markings *= 1.0 - fluid


def _paint_pneumothorax(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas, rng: np.random.Generator
                        ) -> None:
    """A lucent rim without markings along the chest wall, bounded by a thin visceral pleural line."""
    c, sev, x, y = _contrast(f), _severity(f), a.x, a.y
    side = _sides(f)[0]
    depth = (rng.uniform(0.035, 0.06), rng.uniform(0.08, 0.14), rng.uniform(0.18, 0.3))[sev]
    extent = 0.45 if f.zone == "upper" else 1.6
    dist = np.minimum(a.half_width - np.abs(x), (y - a.top) * 0.8)
    limit = ramp(a.top + extent - y, 0.15)
    rim = ramp(depth - dist, a.px) * a.lung[side] * limit
    pleura = np.exp(-(((dist - depth) / (0.8 * a.line_w)) ** 2)) * a.lung[side] * limit
    canvas.atten -= 0.06 * c * rim
    canvas.outline("pneumothorax", rim)
    canvas.atten += 0.16 * c * pleura * (1 - rim) + 0.04 * (1 + sev) * c * a.lung[side] * (1 - rim)
    canvas.markings *= 1.0 - rim


def _paint_consolidation(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas, rng: np.random.Generator
                         ) -> None:
    """A dense patchy opacity (a noise-modulated blob), with air bronchograms when the finding has them."""
    c, sev, x, y, size = _contrast(f), _severity(f), a.x, a.y, a.size
    for side in _sides(f):
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
        canvas.atten += dens * patch
        canvas.outline("consolidation", patch, 0.25)  # patchy: a quarter of full density still reads as opacity


def _paint_atelectasis(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas, rng: np.random.Generator
                       ) -> None:
    """Plate-like linear opacities; a severe one-sided atelectasis is a lobar collapse wedge instead."""
    c, sev, x, y = _contrast(f), _severity(f), a.x, a.y
    for side in _sides(f):
        if f.severity == "severe" and f.laterality != "bilateral":
            sgn = SIDE_SIGN[side]
            if f.zone == "upper":
                span = np.clip((a.top + 0.45 - y) / 0.45, 0.0, 1.0)
            else:
                span = np.clip(1.0 - (a.dome[side] + 0.1 - y) / 0.5, 0.0, 1.0)
            wedge = ramp(a.medial + 0.3 * span - sgn * (x - a.mshift), a.edge) * a.lung[side] * (span > 0)
            canvas.atten += 0.3 * c * wedge
            continue
        for _ in range(1 if sev == 0 else 2):
            cx, cy = a.zone_point(rng, side, f.zone, (0.2, 0.7))
            length = rng.uniform(0.1, 0.22) * (1 + 0.3 * sev)
            angle = rng.uniform(-0.35, 0.35) + SIDE_SIGN[side] * 0.15
            dx, dy = length * math.cos(angle), length * math.sin(angle)
            thick = (rng.uniform(0.012, 0.018), rng.uniform(0.02, 0.03), rng.uniform(0.03, 0.04))[sev]
            plate = polyline(x, y, [(cx - dx, cy - dy), (cx + dx, cy + dy)], max(thick, a.line_w))
            canvas.atten += (0.2 + 0.05 * sev) * c * plate * a.lung[side]


def _paint_edema(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas, rng: np.random.Generator) -> None:
    """Bilateral perihilar haze, thickened markings and Kerley B lines at the bases."""
    c, sev, x, y = _contrast(f), _severity(f), a.x, a.y
    lungs = a.lung["right"] + a.lung["left"]
    sx = (0.18, 0.24, 0.3)[sev]
    haze = np.exp(-0.5 * (((a.ax - a.med0 - 0.12) / sx) ** 2 + ((y + 0.02) / 0.32) ** 2))
    patchy = 1.0 if sev < 2 else np.clip(0.7 + 0.5 * smooth_noise(rng, a.size, 8), 0.0, 1.2)
    canvas.atten += (0.06, 0.1, 0.18)[sev] * c * haze * patchy * lungs
    canvas.markings *= 1.0 + (0.5, 0.9, 1.3)[sev] * c
    near_wall = ramp(0.1 - (a.half_width - np.abs(x)), 0.03)
    bases = ramp(y - (max(a.dome.values()) - 0.35), 0.1)
    kerley = np.clip((np.cos(2 * math.pi * y / 0.045) - 0.7) / 0.3, 0.0, 1.0)
    canvas.atten += (0.03, 0.05, 0.06)[sev] * c * kerley * near_wall * bases * lungs


def _paint_nodule(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas, rng: np.random.Generator) -> None:
    """A small round soft-edged opacity of the finding's diameter."""
    c, x, y = _contrast(f), a.x, a.y
    side = _sides(f)[0]
    cx, cy = a.zone_point(rng, side, f.zone, (0.2, 0.85))
    radius = f.params.get("diameter_mm", 10) / 200.0
    dist = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    disc = ramp(radius - dist, max(a.px, 0.3 * radius))
    canvas.atten += 0.3 * c * disc * a.lung[side]
    canvas.outline("nodule", disc * a.lung[side])


def _paint_cardiomegaly(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas, rng: np.random.Generator
                        ) -> None:
    """Nothing to add: cardiomegaly sets the patient's cardiothoracic ratio, which the anatomy draws."""


def _ett(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas) -> None:
    m, c = a.mshift, _contrast(f)
    canvas.atten = canvas.atten + 0.2 * c * polyline(a.x, a.y, [(m, -1.1), (m + 0.005, -0.52)], 1.4 * a.line_w)


_SVC_Y = -0.12  # where central lines and PICCs end: the superior vena cava, on the patient's right of the midline


def _central_line(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas) -> None:
    m, c = a.mshift, _contrast(f)
    s = SIDE_SIGN[f.params.get("device_sides", {}).get("central_line", "right")]
    svc = (m - 0.07, _SVC_Y)
    if f.params.get("central_line_route") == "subclavian":
        pts = [(m + s * 0.8, -0.82), (m + s * 0.4, -0.74), (m + s * 0.12, -0.6), (svc[0], -0.35), svc]
    else:
        pts = [(m + s * 0.25, -1.1), (m + s * 0.15, -0.75), (m + s * 0.08, -0.5), (svc[0], -0.3), svc]
    canvas.atten = canvas.atten + 0.18 * c * polyline(a.x, a.y, pts, a.line_w)


def _picc(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas) -> None:
    m, c = a.mshift, _contrast(f)
    s = SIDE_SIGN[f.params.get("device_sides", {}).get("picc", "right")]
    svc = (m - 0.07, _SVC_Y)
    pts = [(m + s * 1.1, -0.5), (m + s * 0.85, -0.7), (m + s * 0.4, -0.76), (m + s * 0.12, -0.6), svc]
    canvas.atten = canvas.atten + 0.16 * c * polyline(a.x, a.y, pts, a.line_w)


def _pacemaker(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas) -> None:
    x, y, m, c = a.x, a.y, a.mshift, _contrast(f)
    s = SIDE_SIGN[f.params.get("device_sides", {}).get("pacemaker", "left")]
    bx, by = m + s * 0.58 * a.w, -0.62
    box = ramp(0.075 - np.abs(x - bx), a.px) * ramp(0.05 - np.abs(y - by), a.px)
    canvas.atten = canvas.atten + 0.4 * c * box
    apex = (m + 0.25 * case.patient["ctr"] * a.w + 0.1, 0.5 * (a.dome["right"] + a.dome["left"]))
    for tip in ((m - 0.12, -0.02), apex):  # atrial and ventricular leads
        pts = [(bx - s * 0.05, by), (m + s * 0.1, -0.72), (m - 0.05, -0.45), (m - 0.08, -0.15), tip]
        canvas.atten = canvas.atten + 0.2 * c * polyline(x, y, pts, a.line_w)


def _enteric_tube(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas) -> None:
    m, c = a.mshift, _contrast(f)
    pts = [(m + 0.01, -1.1), (m + 0.02, -0.3), (m + 0.05, a.dome["left"] - 0.05),
           (m + 0.3 * a.w, a.dome["left"] + 0.15), (m + 0.45 * a.w, a.dome["left"] + 0.2)]
    canvas.atten = canvas.atten + 0.16 * c * polyline(a.x, a.y, pts, a.line_w)


DEVICE_PAINTERS: dict[str, Callable[[Anatomy, Case, FindingSpec, Canvas], None]] = {
    "ett": _ett,
    "central_line": _central_line,
    "picc": _picc,
    "pacemaker": _pacemaker,
    "enteric_tube": _enteric_tube,
}


def _paint_devices(a: Anatomy, case: Case, f: FindingSpec, canvas: Canvas, rng: np.random.Generator) -> None:
    """Each device of the finding (ET tube, central line, PICC, pacemaker with leads, enteric tube)."""
    for kind in f.params.get("devices", []):
        painter = DEVICE_PAINTERS.get(kind)
        if painter is not None:
            painter(a, case, f, canvas)


PAINTERS: dict[str, Painter] = {
    "pleural_effusion": _paint_effusion,
    "pneumothorax": _paint_pneumothorax,
    "consolidation": _paint_consolidation,
    "atelectasis": _paint_atelectasis,
    "edema": _paint_edema,
    "nodule": _paint_nodule,
    "cardiomegaly": _paint_cardiomegaly,
    "support_devices": _paint_devices,
}


def paint_findings(a: Anatomy, case: Case, canvas: Canvas, rng: np.random.Generator) -> None:
    """Add each finding of `case`, in order, to `canvas`; `canvas.masks` (when given) receives, for the mask
    findings, bool (S, S) maps where the finding's opacity or lucency is at least half its full strength.

    Args:
        a: the patient's anatomy (coordinates, lungs, domes).
        case: the case whose findings to paint.
        canvas: the film to paint on, changed in place.
        rng: the picture stream; each painter draws from it in a fixed order.
    """
    for f in case.findings:
        painter = PAINTERS.get(f.name)
        if painter is not None:
            painter(a, case, f, canvas, rng)
