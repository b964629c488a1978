"""SynthCXR: determinism, manifest contents, the 5x200 set, prevalences and what findings draw."""

from __future__ import annotations

import copy
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medunifier.data.findings import COMPETITION_FINDINGS, FINDINGS
from medunifier.data.manifest import read_manifest
from medunifier.data.reports import FindingSpec, write_report
from medunifier.data.synthcxr import (
    EVAL_STREAM,
    Case,
    SynthConfig,
    _rngs,
    generate_sample,
    render,
    sample_case,
    synthesize,
    write_synthcxr,
)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_whatever_the_worker_count(tmp_path: Path) -> None:
    one = write_synthcxr(tmp_path / "a", n=20, size=32, seed=7, workers=1, per_class_5x200=2)
    write_synthcxr(tmp_path / "b", n=20, size=32, seed=7, workers=2, per_class_5x200=2)
    write_synthcxr(tmp_path / "c", n=20, size=32, seed=8, workers=1, per_class_5x200=2)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert len(a) == 20 + 10 + 3  # images, 5x200 images, two manifests and synthcxr.json
    assert a == b
    changed = [name for name in a if a[name] != c.get(name)]
    assert len(changed) == len(a)  # another seed changes every image and both manifests
    assert one["n"] == 20 and sum(one["splits"].values()) == 20


def test_manifest_records_and_images(tmp_path: Path) -> None:
    write_synthcxr(tmp_path, n=40, size=48, seed=1, workers=1, per_class_5x200=0)
    records, report = read_manifest(tmp_path / "manifest.jsonl", strict=True)
    assert report.skipped == 0 and len(records) == 40
    assert not (tmp_path / "manifest_5x200.jsonl").exists()
    assert Counter(r.split for r in records) == {"train": 32, "val": 4, "test": 4}
    for i, r in enumerate(records):
        assert r.id == f"synthcxr-{i:06d}" and r.image == f"images/{i:06d}.png"
        assert (r.modality, r.task, r.source) == ("cxr", "report", "synthcxr")
        assert set(r.labels) == set(FINDINGS)
        assert r.text == f"FINDINGS: {r.findings} IMPRESSION: {r.impression}"
        assert r.labels["no_finding"] == int(not any(r.labels[n] for n in FINDINGS if n != "no_finding"))
        details = r.model_extra["finding_details"]
        assert sorted(d["name"] for d in details) == sorted(n for n in FINDINGS if r.labels[n] and n != "no_finding")
        for d in details:
            assert d["severity"] in ("mild", "moderate", "severe")
            assert d["laterality"] in (None, "left", "right", "bilateral")
        with Image.open(tmp_path / r.image) as img:
            assert img.size == (48, 48) and img.mode == "L"


def test_5x200_set_has_exactly_one_clean_finding_per_image(tmp_path: Path) -> None:
    write_synthcxr(tmp_path, n=0, size=32, seed=2, workers=2, per_class_5x200=3)
    records, _ = read_manifest(tmp_path / "manifest_5x200.jsonl", strict=True)
    assert len(records) == 15 and all(r.split == "test" for r in records)
    positives = Counter()
    for r in records:
        on = [name for name, v in r.labels.items() if v == 1]
        assert len(on) == 1 and on[0] in COMPETITION_FINDINGS, on  # nothing else, not even devices
        positives[on[0]] += 1
        assert (tmp_path / r.image).is_file() and r.image.startswith("images_5x200/")
    assert positives == {name: 3 for name in COMPETITION_FINDINGS}


def test_prevalences_and_config_knobs() -> None:
    cases = [sample_case(_rngs(0, 0, i)[0]) for i in range(3000)]
    labels = [c.labels() for c in cases]
    rate = {name: np.mean([lab[name] for lab in labels]) for name in FINDINGS}
    assert 0.28 <= rate["no_finding"] <= 0.42, rate
    assert all(0.03 <= rate[name] <= 0.3 for name in FINDINGS if name != "no_finding"), rate
    # several findings per image happen, and some positives are subtle
    assert np.mean([len(c.findings) >= 2 for c in cases]) > 0.1
    subtle = [f.subtle for c in cases for f in c.findings if f.name != "support_devices"]
    assert 0.1 < np.mean(subtle) < 0.3

    none = SynthConfig(prevalence={name: 0.0 for name in FINDINGS})
    assert all(sample_case(_rngs(0, 0, i)[0], none).labels()["no_finding"] == 1 for i in range(50))
    always = SynthConfig(prevalence={"nodule": 1.0}, subtle_fraction=1.0)
    for i in range(20):
        case = sample_case(_rngs(0, 0, i)[0], always)
        nodule = next(f for f in case.findings if f.name == "nodule")
        assert nodule.subtle and nodule.severity == "mild"


def _difference(case: Case, size: int = 96) -> np.ndarray:
    """Rendered image minus the same patient rendered without findings (same noise)."""
    normal = copy.deepcopy(case)
    normal.findings = []
    return render(case, size, np.random.default_rng(0)) - render(normal, size, np.random.default_rng(0))


@pytest.mark.parametrize("name", ["pleural_effusion", "pneumothorax", "consolidation", "nodule", "atelectasis"])
def test_lateralised_findings_change_the_correct_side(name: str) -> None:
    """Patient right is the image's left: the change must sit on the named side."""
    checked = 0
    for i in range(40):
        case = sample_case(_rngs(3, EVAL_STREAM, i)[0], only=name)
        finding = case.findings[0]
        if finding.laterality not in ("left", "right") or finding.subtle or finding.severity == "severe":
            continue  # severe atelectasis shifts the mediastinum, which changes both sides
        diff = np.abs(_difference(case))
        left_half, right_half = diff[:, :48].sum(), diff[:, 48:].sum()
        if finding.laterality == "right":
            assert left_half > 2 * right_half, (i, finding)
        else:
            assert right_half > 2 * left_half, (i, finding)
        checked += 1
    assert checked >= 5


def test_cardiomegaly_enlarges_the_heart_and_subtle_findings_are_fainter() -> None:
    base = sample_case(_rngs(4, 0, 0)[0], SynthConfig(prevalence={name: 0.0 for name in FINDINGS}))
    areas = []
    for ctr in (0.42, 0.62):
        case = copy.deepcopy(base)
        case.patient["ctr"] = ctr
        areas.append((render(case, 96, np.random.default_rng(0)) > 0.7).sum())
    assert areas[1] > areas[0] * 1.05

    spec = FindingSpec("consolidation", "right", "lower", "moderate", params={"contrast": 1.0})
    strong = Case(copy.deepcopy(base.patient), [spec])
    faint = Case(copy.deepcopy(base.patient), [copy.deepcopy(spec)])
    faint.findings[0].params["contrast"] = 0.55
    assert np.abs(_difference(faint)).sum() < 0.7 * np.abs(_difference(strong)).sum()


def test_images_look_like_chest_films() -> None:
    """Dark lungs, bright mediastinum and abdomen, and patient-to-patient variation."""
    images, _ = synthesize(12, size=64, seed=5)
    assert images.shape == (12, 64, 64) and images.dtype == np.uint8
    lung = images[:, 20:34, 10:20].astype(float).mean()  # patient right upper-mid lung
    mediastinum = images[:, 10:30, 29:35].astype(float).mean()
    abdomen = images[:, 56:62, 12:52].astype(float).mean()
    assert mediastinum > lung + 60 and abdomen > lung + 60
    assert np.std([img.mean() for img in images]) > 2.0
    again, _ = synthesize(12, size=64, seed=5, workers=2)
    assert np.array_equal(images, again)


def test_reports_vary_and_negate_absent_findings() -> None:
    positives: dict[str, set[str]] = {}
    orders = set()
    for i in range(400):
        case_rng, _, text_rng = _rngs(6, EVAL_STREAM, i)
        name = COMPETITION_FINDINGS[i % 5]
        case = sample_case(case_rng, only=name)
        findings, impression = write_report(case.findings, text_rng)
        sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", findings) if s.strip()]
        orders.add(tuple(sentences))
        positives.setdefault(name, set()).update(
            re.sub(r"\b(right|left|bilateral|small|moderate|large|mild|marked|severe)\b", "_", s.lower())
            for s in sentences if not re.match(r"(no|there is no|negative|heart size is normal|the heart is normal)", s.lower()))
        assert impression
    for name, statements in positives.items():
        assert len(statements) >= 5, (name, statements)
    _, record = generate_sample(0, 1, size=32, config=SynthConfig(prevalence={n: 0.0 for n in FINDINGS},
                                                                   mention_absent=1.0))
    text = record["findings"].lower()
    for word in ("pneumothorax", "effusion", "edema", "atelectasis"):
        assert word in text  # every absence is stated when mention_absent = 1
    assert len(orders) > 300


def test_cli_data_synth(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medunifier.cli import app

    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--n", "10", "--size", "32",
                                      "--seed", "3", "--workers", "1", "--per-class-5x200", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote 15 images" in result.output
    records, _ = read_manifest(tmp_path / "manifest.jsonl", strict=True)
    assert len(records) == 10 and len(list((tmp_path / "images").glob("*.png"))) == 10
    bad = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--size", "8"])
    assert bad.exit_code != 0
