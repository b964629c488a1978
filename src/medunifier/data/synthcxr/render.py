"""Rendering a SynthCXR film: anatomy, then findings, then exposure, contrast and noise (`render`), and one
image with its report record (`generate_sample`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from medunifier.data.reports import report_text, write_report
from medunifier.data.synthcxr.anatomy import Anatomy, draw_anatomy, heart_shape
from medunifier.data.synthcxr.painters import Canvas, paint_findings
from medunifier.data.synthcxr.primitives import smooth_noise
from medunifier.data.synthcxr.sampling import (
    EVAL_STREAM,
    MAIN_STREAM,
    Case,
    SynthConfig,
    _rngs,
    sample_case,
    split_of,
)

__all__ = ["IMAGE_KINDS", "MASK_FINDINGS", "generate_sample", "render"]

IMAGE_KINDS = ("radiograph", "soft_tissue", "bone")  # what `render` draws from one phantom
MASK_FINDINGS = ("heart", "pleural_effusion", "pneumothorax", "consolidation", "nodule")  # segment targets


def render(case: Case, size: int, rng: np.random.Generator, kind: str = "radiograph",
           masks: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The film of `case` as float32 (size, size) in [0, 1].

    Args:
        case: the patient and findings to draw.
        size: the image side in pixels.
        rng: the picture stream (anatomy, findings and noise all draw from it).
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
    a = Anatomy(p, size)
    layers: dict[str, np.ndarray] = {}
    atten, markings = draw_anatomy(a, p, rng, bones=0.0 if kind == "soft_tissue" else 1.0, layers=layers)
    canvas = Canvas(atten, markings, masks)
    paint_findings(a, case, canvas, rng)
    lungs = a.lung["right"] + a.lung["left"]
    atten = canvas.atten + 0.1 * canvas.markings * lungs
    if masks is not None:
        masks["heart"] = heart_shape(a, p)[0] >= 0.5
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


def generate_sample(seed: int, index: int, size: int = 128, config: SynthConfig | None = None,
                    stream: int = MAIN_STREAM, only: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """One image (uint8, (size, size)) and its manifest record (without the image path).

    Args:
        seed: the dataset seed.
        index: the image's index in its stream (each index has its own seeds).
        size: the image side in pixels.
        config: the generator's knobs (`SynthConfig()` when None).
        stream: `MAIN_STREAM` or `EVAL_STREAM` (the 5x200 set: split "test", ids "synthcxr5x200-...").
        only: draw exactly this finding and nothing else (the 5x200 set).
    """
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
        "split": "test" if stream == EVAL_STREAM else split_of(index, cfg.split_fractions),
        "modality": "cxr",
        "task": "report",
        "source": "synthcxr",
        "finding_details": [f.to_json() for f in case.findings],
        "patient": case.patient,
        "seed": seed,
        "index": index,
    }
    return (image * 255.0 + 0.5).astype(np.uint8), record
