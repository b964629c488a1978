"""Sampling one SynthCXR case: the generator's knobs, a patient's anatomy and its findings, and the seeds,
splits and streams that make every image reproducible on its own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medunifier.data.findings import COMPETITION_FINDINGS, FINDINGS
from medunifier.data.reports import SEVERITIES, FindingSpec

__all__ = [
    "DEFAULT_PREVALENCE", "EVAL_STREAM", "I2I_STREAM", "MAIN_STREAM", "PAIR_FINDINGS",
    "PAIR_STREAM", "SIDE_SIGN", "Case", "SynthConfig", "eval_finding", "pick", "round4", "sample_case", "sample_finding",
    "split_of",
]

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


def round4(x: float) -> float:
    """`x` as a plain float rounded to 4 decimals (what the records store)."""
    return round(float(x), 4)


def _choice(rng: np.random.Generator, options: Sequence[str], weights: Sequence[float]) -> str:
    p = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of `options`, uniformly."""
    return options[int(rng.integers(len(options)))]


def _sample_patient(rng: np.random.Generator, cfg: SynthConfig) -> dict[str, Any]:
    dome_right = rng.uniform(0.18, 0.32)
    return {
        "sex": "F" if rng.random() < 0.5 else "M",
        "age": int(rng.integers(18, 91)),
        "thorax_half_width": round4(rng.uniform(*cfg.habitus)),
        "soft_tissue": round4(rng.uniform(0.7, 1.4)),
        "apex_y": round4(rng.uniform(-0.9, -0.78)),
        "dome_right_y": round4(dome_right),
        "dome_left_y": round4(dome_right + rng.uniform(0.0, 0.08)),
        "dome_curve": round4(rng.uniform(0.22, 0.32)),
        "ctr": round4(rng.uniform(*cfg.normal_ctr)),
        "heart_height": round4(rng.uniform(0.2, 0.26)),
        "heart_tilt": round4(rng.uniform(0.25, 0.5)),
        "mediastinum_half_width": round4(rng.uniform(0.11, 0.15)),
        "mediastinal_shift": 0.0,
        "rotation_deg": round4(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)),
        "shift": [round4(rng.uniform(-0.05, 0.05)), round4(rng.uniform(-0.04, 0.06))],
        "zoom": round4(rng.uniform(0.92, 1.06)),
        "rib_spacing": round4(rng.uniform(0.135, 0.17)),
        "exposure": round4(rng.uniform(0.85, 1.2)),
        "brightness": round4(rng.uniform(-0.06, 0.06)),
        "gamma": round4(rng.uniform(0.8, 1.25)),
        "noise": round4(rng.uniform(*cfg.noise_std)),
        "breast_shadows": False,
        "projection": "PA",
        "heart_magnification": round4(rng.uniform(0.95, 1.05)),
    }


def sample_finding(name: str, rng: np.random.Generator, cfg: SynthConfig) -> FindingSpec:
    """One positive finding `name`: severity (or subtle), contrast, laterality, zone and its own parameters."""
    subtle = bool(rng.random() < cfg.subtle_fraction)
    severity = "mild" if subtle else _choice(rng, SEVERITIES, cfg.severity_weights)
    contrast = cfg.finding_contrast * (cfg.subtle_contrast if subtle else 1.0) * rng.uniform(0.85, 1.15)
    spec = FindingSpec(name=name, severity=severity, subtle=subtle, params={"contrast": round4(contrast)})
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
        spec.params["ctr"] = round4(rng.uniform(low, high))
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
        spec.params["contrast"] = round4(cfg.finding_contrast * rng.uniform(0.3, 0.9))  # faint lines are easy to miss
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
    findings = [sample_finding(name, rng, cfg) for name in present]
    # portable AP films (more common with lines and tubes) magnify the heart: a real confounder of CTR
    if rng.random() < (0.7 if "support_devices" in present else 0.2):
        patient["projection"] = "AP"
        patient["heart_magnification"] = round4(rng.uniform(1.04, 1.16))
    for f in findings:  # findings that change the anatomy
        if f.name == "cardiomegaly":
            patient["ctr"] = f.params["ctr"]
        if f.name == "atelectasis" and f.severity != "mild" and f.laterality != "bilateral":
            lift = rng.uniform(0.04, 0.07) if f.severity == "moderate" else rng.uniform(0.08, 0.13)
            key = f"dome_{f.laterality}_y"
            patient[key] = round4(patient[key] - lift)
            if f.severity == "severe":
                patient["mediastinal_shift"] = round4(SIDE_SIGN[f.laterality] * rng.uniform(0.02, 0.045))
    return Case(patient=patient, findings=findings)


def _rngs(seed: int, stream: int, index: int) -> list[np.random.Generator]:
    """Independent generators for the case, the picture and the report of one image."""
    children = np.random.SeedSequence(entropy=seed, spawn_key=(stream, index)).spawn(3)
    return [np.random.default_rng(s) for s in children]


def split_of(index: int, fractions: tuple[float, float, float]) -> str:
    """The split ("train", "val" or "test") of image `index` for (train, val, test) `fractions`."""
    u = ((index * 7) % 10 + 0.5) / 10.0  # each block of 10 consecutive images splits 8/1/1 exactly
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


def eval_finding(index: int, per_class: int) -> str:
    """The competition finding of image `index` in the 5x200 set (blocks of `per_class`)."""
    return COMPETITION_FINDINGS[index // per_class]
