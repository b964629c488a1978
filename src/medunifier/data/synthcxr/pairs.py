"""Counterfactual pairs of SynthCXR: one patient rendered without and with one added finding, the reports of
both images and the "edit" record with a natural instruction that links them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medunifier.data.reports import (
    DEGREE_WORDS,
    SIZE_WORDS,
    FindingSpec,
    _location,
    report_text,
    write_report,
)
from medunifier.data.synthcxr.anatomy import Anatomy, heart_shape
from medunifier.data.synthcxr.render import render
from medunifier.data.synthcxr.sampling import (
    PAIR_FINDINGS,
    PAIR_STREAM,
    Case,
    SynthConfig,
    pick,
    sample_case,
    sample_finding,
    split_of,
)

__all__ = [
    "CounterfactualPair", "edit_instruction", "finding_region", "generate_pair", "sample_pair", "synthesize_pairs",
]


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


def edit_instruction(spec: FindingSpec, rng: np.random.Generator) -> str:
    """A natural instruction that adds `spec`: "add a moderate left pleural effusion", "introduce mild
    cardiomegaly", "show patchy consolidation in the right lower lobe". It always names the finding."""
    verb = pick(rng, ("add", "introduce", "show"))
    side, sev = spec.laterality, spec.severity
    if spec.name == "pleural_effusion":
        size = pick(rng, SIZE_WORDS[sev])
        phrase = f"{size} bilateral pleural effusions" if side == "bilateral" else f"a {size} {side} pleural effusion"
    elif spec.name == "pneumothorax":
        phrase = f"a {pick(rng, SIZE_WORDS[sev])} {side}{' apical' if spec.zone == 'upper' else ''} pneumothorax"
    elif spec.name == "cardiomegaly":
        phrase = f"{pick(rng, DEGREE_WORDS[sev])} cardiomegaly"
    elif spec.name == "edema":
        phrase = f"{pick(rng, DEGREE_WORDS[sev])} pulmonary edema"
    elif spec.name == "consolidation":
        quality = {"mild": "patchy", "moderate": "focal", "severe": "dense"}[sev]
        phrase = f"{quality} consolidation in {_location('noun', side, spec.zone, rng)}"
    elif spec.name == "atelectasis":
        quality = {"mild": "subsegmental", "moderate": "plate-like", "severe": "extensive"}[sev]
        phrase = f"{quality} atelectasis in {_location('noun', side, spec.zone, rng)}"
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
    added = sample_finding(name, rng, cfg)
    if name == "atelectasis" and added.severity == "severe":
        added.severity = "moderate"
    patient = dict(source.patient)
    if name == "cardiomegaly":
        patient["ctr"] = added.params["ctr"]
    return source, Case(patient=patient, findings=[*source.findings, added]), added


def finding_region(source: Case, target: Case, added: FindingSpec, size: int) -> np.ndarray:
    """bool (S, S): the pixels where adding `added` to `source` (giving `target`) can change the image."""
    a = Anatomy(target.patient, size)
    if added.name == "cardiomegaly":  # the heart grows: the old and the new silhouette
        return (heart_shape(a, source.patient)[0] > 0) | (heart_shape(a, target.patient)[0] > 0)
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
    split = split_of(index, cfg.split_fractions)
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
