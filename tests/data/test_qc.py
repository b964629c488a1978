"""`medunifier data qc` on a SynthCXR set seeded with known problems: every planted problem is found, no clean
record is dropped, the input is untouched, and the reports (JSON, HTML with thumbnails) say what and why."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.data.images import load_image, save_png
from medunifier.data.manifest import read_manifest
from medunifier.data.qc import QCSettings, clean_placeholders, dhash, run_qc
from medunifier.data.synthcxr import write_synthcxr

CLEAN_TEXT = "FINDINGS: The heart size is normal. The lungs are clear. IMPRESSION: No acute cardiopulmonary process."


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthcxr(out, 40, size=64, per_class_5x200=0, pairs=2, workers=1)
    return out


@pytest.fixture
def planted(synth: Path, tmp_path: Path) -> tuple[Path, dict[str, str], list[str]]:
    """A copy of the set plus one record per problem; returns (manifest, {planted id: reason}, clean ids)."""
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    lines = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    clean_ids = [r["id"] for r in lines]
    reports = [r for r in lines if r["task"] == "report" and not r.get("pair_id")]
    rng = np.random.default_rng(0)

    def noise_image(name: str, shape=(64, 64)) -> str:
        save_png(rng.random(shape).astype(np.float32), data / "images" / name)
        return f"images/{name}"

    def record(rid: str, image: str | None, **fields) -> dict:
        return {"id": rid, "image": image, "text": CLEAN_TEXT, "split": "train", "modality": "cxr", **fields}

    original = data / reports[0]["image"]
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    shutil.copy(original, data / "images" / "copy.png")
    tweaked = np.clip(load_image(data / reports[1]["image"]) * 0.97 + 0.01, 0, 1)
    save_png(tweaked, data / "images" / "tweaked.png")
    save_png(np.full((64, 64), 0.5, np.float32), data / "images" / "blank.png")
    half = np.zeros((64, 64), np.float32)
    half[:, 32:] = 1.0
    save_png(half, data / "images" / "saturated.png")
    save_png(np.ones((1, 1), np.float32), tmp_path / "outside.png")
    problems = {
        "p-unreadable": ("unreadable_image", record("p-unreadable", "images/corrupt.png")),
        "p-exact": ("exact_duplicate", record("p-exact", "images/copy.png")),
        "p-near": ("near_duplicate", record("p-near", "images/tweaked.png")),
        "p-blank": ("blank_image", record("p-blank", "images/blank.png")),
        "p-saturated": ("saturated_image", record("p-saturated", "images/saturated.png")),
        "p-aspect": ("extreme_aspect", record("p-aspect", noise_image("wide.png", (32, 160)))),
        "p-empty": ("empty_report", record("p-empty", noise_image("e.png"), text="", findings=None)),
        "p-short": ("short_report", record("p-short", noise_image("s.png"), text="Normal.")),
        "p-lateral": ("non_frontal_view", record("p-lateral", noise_image("l.png"), view="LATERAL")),
        "p-labels": ("label_disagreement", record("p-labels", noise_image("lab.png"), labels={"cardiomegaly": 1})),
        "p-escape": ("unsafe_path", record("p-escape", "../outside.png")),
    }
    extra = [r for _, r in problems.values()]
    duplicate = {**reports[2], "text": "a second record under an existing id"}
    lines[3] = {**lines[3], "text": lines[3]["text"] + " Discussed with Dr. ___ on XXXX."}
    lines[4] = {**lines[4], "view": "PA"}  # a recorded frontal view is fine
    text = "".join(json.dumps(r) + "\n" for r in [*lines, *extra, duplicate])
    (data / "manifest.jsonl").write_text(text)
    expected = {rid: reason for rid, (reason, _) in problems.items()}
    return data / "manifest.jsonl", expected, clean_ids


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_qc_finds_every_planted_problem_and_drops_no_clean_record(planted) -> None:
    manifest, expected, clean_ids = planted
    before = _digest(manifest)
    result = run_qc(manifest, manifest.with_name("clean.jsonl"))
    assert _digest(manifest) == before  # the input is never modified

    found: dict[str, set[str]] = {}
    for f in result.findings:
        found.setdefault(f.id or f"line {f.line}", set()).add(f.reason)
    for rid, reason in expected.items():
        key = rid if reason != "unsafe_path" else next(k for k, v in found.items() if "unsafe_path" in v)
        assert reason in found.get(key, set()), (rid, reason, found.get(key))
    assert any("duplicate_id" in v for v in found.values())
    # the later copy of a duplicate id is dropped under the clean record's id; the first copy is kept (below)
    dropped = [f for f in result.findings if f.action == "dropped" and f.reason != "duplicate_id"]
    assert not {f.id for f in dropped} & set(clean_ids) - {None}, [(f.id, f.reason) for f in dropped
                                                                   if f.id in clean_ids]

    kept, _ = read_manifest(result.manifest, strict=True)
    assert [r.id for r in kept] == clean_ids  # every clean record, in order, none of the planted ones
    deid = kept[3]
    assert "___" not in deid.text and "XXXX" not in deid.text and deid.text.endswith("Discussed with Dr. on.")
    assert any(f.reason == "deid_placeholder" and f.action == "cleaned" for f in result.findings)
    assert result.kept == len(clean_ids) and result.dropped == len(expected) + 1

    data = json.loads(result.report_json.read_text())
    assert data["kept"] == len(clean_ids) and data["by_reason"]["near_duplicate"] == 1
    assert {f["reason"] for f in data["findings"]} >= set(expected.values()) | {"duplicate_id"}
    page = result.report_html.read_text()
    assert page.count("data:image/png;base64,") >= 8 and 'id="counts"' in page
    assert "<script" not in page and "p-near" in page and "dHash" in page


def test_keep_flags_without_dropping_and_thresholds_apply(planted) -> None:
    manifest, _, clean_ids = planted
    result = run_qc(manifest, manifest.with_name("flagged.jsonl"), keep=True,
                    settings=QCSettings(check_views=False, check_labels=False))
    kept, _ = read_manifest(result.manifest)
    flags = {r.id: (r.model_extra or {}).get("qc_flags") for r in kept}
    assert set(clean_ids) <= set(flags) and not any(flags[i] for i in clean_ids)
    assert flags["p-blank"] == ["blank_image"] and flags["p-lateral"] is None and flags["p-labels"] is None
    assert "p-escape" not in flags  # a path outside the folder is never kept
    with pytest.raises(ValueError, match="never modifies its input"):
        run_qc(manifest, manifest)


def test_cli_data_qc(planted) -> None:
    manifest, _, _ = planted
    out = manifest.parent / "qc" / "manifest.jsonl"
    result = CliRunner().invoke(app, ["data", "qc", str(manifest), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "near_duplicate 1" in result.output and "qc_report.html" in result.output
    assert (out.parent / "qc_report.json").exists() and (out.parent / "qc_report.html").exists()
    # the cleaned manifest in another folder points back at the images: readable with the image root
    records, _ = read_manifest(out, image_root=manifest.parent)
    assert records and all(r.image.startswith("../") for r in records if r.image)


def test_helpers() -> None:
    assert clean_placeholders("Dr. ___ called XXXX at ___ .") == "Dr. called at."
    assert clean_placeholders("XXXXL sized") == "XXXXL sized"  # a word containing X's is left alone
    grey = np.random.default_rng(1).random((64, 48))
    assert dhash(grey).shape == (256,) and (dhash(grey) == dhash(grey * 0.9 + 0.05)).mean() > 0.95
