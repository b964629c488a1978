"""SynthCXR: determinism, manifest contents, the 5x200 set, prevalences and what findings draw."""

from __future__ import annotations

import copy
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
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


# ------------------------------------------------------------------------------ counterfactual pairs


def test_pairs_differ_only_inside_the_added_findings_region() -> None:
    from medunifier.data.labeler import label_report
    from medunifier.data.synthcxr import PAIR_FINDINGS, synthesize_pairs

    pairs = synthesize_pairs(48, size=48, seed=1)
    assert {p.added.name for p in pairs} == set(PAIR_FINDINGS)  # every pair finding is drawn
    for p in pairs:
        src, tgt = p.source_record, p.target_record
        diff = np.abs(p.source_image.astype(int) - p.target_image.astype(int))
        # the region comes from the anatomy (lung of the side, the hearts), not from the pixels: outside it the
        # two films are identical, inside it the finding shows, and it is a part of the image only
        assert p.region.any() and p.region.mean() < 0.7
        assert diff[~p.region].max() == 0, p.added
        assert diff[p.region].max() >= 10, p.added
        assert (diff == 0).mean() > 0.3
        # the same patient (the heart size is what cardiomegaly changes), the earlier findings kept
        changed_params = {k for k in src["patient"] if src["patient"][k] != tgt["patient"][k]}
        assert changed_params == ({"ctr"} if p.added.name == "cardiomegaly" else set())
        assert tgt["finding_details"][:-1] == src["finding_details"] and tgt["finding_details"][-1]["name"] == p.added.name
        # labels differ exactly in the added finding (and no_finding when the source was normal)
        changed = {k for k in FINDINGS if src["labels"][k] != tgt["labels"][k]}
        assert changed == {p.added.name} | ({"no_finding"} if src["labels"]["no_finding"] else set())
        assert src["labels"][p.added.name] == 0 and tgt["labels"][p.added.name] == 1
        # each report matches its own image; the edit names the finding, its side and links the pair
        assert label_report(tgt["text"])[p.added.name] == 1 and label_report(src["text"])[p.added.name] == 0
        edit = p.edit_record
        assert {k for k, v in label_report(edit["instruction"]).items() if v == 1} == {p.added.name}
        if p.added.laterality in ("left", "right"):  # the lingula is on the left
            assert p.added.laterality in edit["instruction"] or "lingula" in edit["instruction"]
        elif p.added.laterality == "bilateral" and p.added.name != "edema":  # edema is bilateral by nature
            assert "bilateral" in edit["instruction"] or "both" in edit["instruction"]
        assert edit["task"] == "edit" and edit["text"] == tgt["text"] and edit["labels"] == tgt["labels"]
        assert edit["pair_id"] == src["pair_id"] == tgt["pair_id"] and edit["split"] == src["split"] == tgt["split"]


def test_pairs_are_deterministic_at_any_worker_count_and_in_the_manifest(tmp_path: Path) -> None:
    from medunifier.data.dataset import Collator, ManifestDataset
    from medunifier.data.manifest import Record
    from medunifier.data.tokenizer import load_tokenizer

    write_synthcxr(tmp_path / "a", n=6, size=32, seed=4, workers=1, per_class_5x200=0, pairs=7)
    summary = write_synthcxr(tmp_path / "b", n=6, size=32, seed=4, workers=2, per_class_5x200=0, pairs=7)
    write_synthcxr(tmp_path / "c", n=6, size=32, seed=5, workers=1, per_class_5x200=0, pairs=7)
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b and len([k for k in a if k.startswith("images_pairs/")]) == 3 * 7
    assert all(a[k] != c[k] for k in a if k.startswith("images_pairs/") and not k.endswith("_region.png")
               and k.endswith("_target.png"))
    assert sum(summary["pair_findings"].values()) == 7 and summary["splits"] == {"train": 5, "val": 1, "test": 0}

    records, report = read_manifest(tmp_path / "a" / "manifest.jsonl", strict=True)
    assert report.skipped == 0 and len(records) == 6 + 3 * 7
    assert [r.id for r in records[:6]] == [f"synthcxr-{i:06d}" for i in range(6)]  # the main set is unchanged
    edits = [r for r in records if r.task == "edit"]
    by_id = {r.id: r for r in records}
    assert len(edits) == 7
    for e in edits:
        source, target = by_id[f"{e.pair_id}-source"], by_id[f"{e.pair_id}-target"]
        assert (source.task, target.task) == ("report", "report")
        assert e.image == source.image and e.target_image == target.image and e.text == target.text
        assert e.instruction and (tmp_path / "a" / e.model_extra["edit_region"]).is_file()
    # a manifest line written before these fields existed still loads
    old = Record.model_validate({"id": "x", "image": "a.png", "text": "t", "task": "report"})
    assert (old.target_image, old.instruction, old.pair_id) == (None, None, None)

    # the dataset trains an edit record on the target image + target report; the source rides along
    ds = ManifestDataset(tmp_path / "a" / "manifest.jsonl", image_size=32, channels=1)
    index = {r.id: i for i, r in enumerate(ds.records)}
    e = edits[0]
    item = ds[index[e.id]]
    assert item["text"] == e.text and item["task"] == "edit"
    assert torch.equal(item["pixel_values"], ds[index[f"{e.pair_id}-target"]]["pixel_values"])
    assert torch.equal(item["source_pixel_values"], ds[index[f"{e.pair_id}-source"]]["pixel_values"])
    assert not torch.equal(item["pixel_values"], item["source_pixel_values"])
    collate = Collator(load_tokenizer("minilm"), max_length=64)
    batch = collate([ds[0], item, ds[1]])
    assert batch["source_pixel_values"].shape == (3, 1, 32, 32) and batch["has_source"].tolist() == [False, True, False]
    assert torch.equal(batch["source_pixel_values"][1], item["source_pixel_values"])
    assert batch["source_pixel_values"][0].abs().sum() == 0
    assert "source_pixel_values" not in collate([ds[0], ds[1]])

    # shards store an edit record with its target image too
    import json

    from medunifier.data.shards import iter_shard_samples, write_shards

    (shard,) = write_shards(tmp_path / "a" / "manifest.jsonl", tmp_path / "shards", shard_size=100)
    samples = {json.loads(parts["json"])["id"]: parts["png"] for _, parts in iter_shard_samples(shard)}
    assert samples[e.id] == (tmp_path / "a" / e.target_image).read_bytes() != samples[f"{e.pair_id}-source"]


def test_cli_data_synth_pairs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medunifier.cli import app

    result = CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path), "--n", "4", "--size", "32",
                                      "--workers", "1", "--per-class-5x200", "0", "--pairs", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote 10 images" in result.output and "3 counterfactual pairs" in result.output
    records, _ = read_manifest(tmp_path / "manifest.jsonl", strict=True)
    assert Counter(r.task for r in records) == {"report": 4 + 6, "edit": 3}
    assert CliRunner().invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--pairs", "-1"]).exit_code != 0
