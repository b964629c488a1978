"""MIMIC-CXR-JPG 2.0.0 -> manifest (one record per frontal image, or per study).

Official layout under ROOT:
  files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg
  mimic-cxr-2.0.0-split.csv.gz     dicom_id, study_id, subject_id, split (train / validate / test)
  mimic-cxr-2.0.0-metadata.csv.gz  dicom_id, ..., ViewPosition (PA / AP are frontal)
  mimic-cxr-2.0.0-chexpert.csv.gz  subject_id, study_id, 14 labels (1.0 / 0.0 / -1.0 / blank)
Reports (from MIMIC-CXR, `mimic-cxr-reports.zip`) at REPORTS/files/pXX/pSUBJECT/sSTUDY.txt, where
REPORTS is `reports_root` or ROOT itself.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from medunifier.data.converters.common import (
    FRONTAL_VIEWS,
    ConversionSummary,
    Deduplicator,
    ImageWriter,
    check_uncertain,
    chexpert_labels,
    clean_text,
    compose_text,
    find_file,
    finish,
    iter_csv,
    require_file,
)
from medunifier.data.converters.reports import findings_and_impression
from medunifier.data.manifest import Record

SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _study_dir(subject_id: str, study_id: str) -> Path:
    return Path("files") / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"


def _read_report(reports_root: Path, subject_id: str, study_id: str) -> str | None:
    relative = _study_dir(subject_id, study_id).with_suffix(".txt")
    for candidate in (reports_root / relative, reports_root / relative.relative_to("files")):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace")
    return None


def convert_mimic_cxr(root: Path, out: Path, *, reports_root: Path | None = None, uncertain: str = "keep",
                      one_per_study: bool = False, keep_text_only: bool = False, image_size: int | None = None,
                      square: bool = False, min_size: int = 32, seed: int = 0) -> ConversionSummary:
    """Convert MIMIC-CXR-JPG: official splits, frontal views (PA/AP) only, FINDINGS/IMPRESSION, CheXpert labels.

    `one_per_study` keeps one frontal image per study (PA first). `uncertain` is the policy for
    -1 labels (keep, zeros, ones, ignore). `seed` is unused (the splits are official).
    """
    root, out = Path(root), Path(out)
    reports_root = Path(reports_root) if reports_root is not None else root
    summary = ConversionSummary("mimic-cxr", str(out))
    check_uncertain(uncertain)
    split_file = require_file(root, ["mimic-cxr-2.0.0-split.csv"],
                              "mimic-cxr-2.0.0-split.csv(.gz) not found (is this MIMIC-CXR-JPG 2.0.0?)")
    meta_file = find_file(root, ["mimic-cxr-2.0.0-metadata.csv"])
    label_file = find_file(root, ["mimic-cxr-2.0.0-chexpert.csv"])
    views: dict[str, str] = {}
    if meta_file is None:
        summary.notes.append("no metadata file: view positions unknown, every image kept")
    else:
        views = {row["dicom_id"]: row.get("ViewPosition", "") for row in iter_csv(meta_file)}
    labels_by_study: dict[tuple[str, str], dict[str, int]] = {}
    if label_file is None:
        summary.notes.append("no chexpert label file: records have no labels")
    else:
        for row in iter_csv(label_file):
            labels_by_study[(row["subject_id"], row["study_id"])] = chexpert_labels(row, uncertain)

    # Group the frontal images of each study (a group of one per image unless one_per_study).
    dedup = Deduplicator(summary)
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for row in sorted(iter_csv(split_file), key=lambda r: (r["subject_id"], r["study_id"], r["dicom_id"])):
        view = views.get(row["dicom_id"], "")
        if row["dicom_id"] in views and view not in FRONTAL_VIEWS:
            summary.filtered["non_frontal"] += 1
            continue
        if row.get("split") not in SPLITS:
            summary.filtered["unknown_split"] += 1
            continue
        if not dedup.first(row["dicom_id"]):
            continue
        row = {**row, "view": view}
        key = (row["subject_id"], row["study_id"], "" if one_per_study else row["dicom_id"])
        groups[key].append(row)

    writer = ImageWriter(out, summary, image_size, square, min_size)
    records = []
    missing_reports = 0
    study, sections = None, None  # the groups come sorted by study: parse each report once
    for (subject_id, study_id, _), rows in groups.items():
        if study != (subject_id, study_id):
            study = (subject_id, study_id)
            text = _read_report(reports_root, subject_id, study_id)
            sections = None if text is None else [clean_text(s) for s in findings_and_impression(text)]
        if sections is None:
            missing_reports += len(rows)
            summary.filtered["missing_report"] += len(rows)
            continue
        findings, impression = sections
        if not findings and not impression:
            summary.filtered["empty_report"] += len(rows)
            continue
        rows = sorted(rows, key=lambda r: (r["view"] != "PA", r["view"] != "AP", r["dicom_id"]))
        chosen, image = rows[0], None
        for row in rows:
            source = root / _study_dir(subject_id, study_id) / f"{row['dicom_id']}.jpg"
            image = writer.write(source, row["dicom_id"])
            if image is not None:
                chosen = row
                break
        if len(rows) > 1:
            summary.filtered["extra_view"] += len(rows) - 1
        if image is None:
            if not keep_text_only:
                summary.text_only_dropped += 1
                continue
            summary.text_only_kept += 1
        records.append(Record(
            id=chosen["dicom_id"], image=image, text=compose_text(findings, impression), findings=findings,
            impression=impression, labels=labels_by_study.get((subject_id, study_id), {}),
            split=SPLITS[chosen["split"]], modality="cxr", task="report", source="mimic-cxr",
            subject_id=subject_id, study_id=study_id, view=chosen["view"] or None,
        ))
    if missing_reports:
        summary.notes.append(f"{missing_reports} images without a report file under {reports_root}/files "
                             "(pass --reports-root if the reports are elsewhere)")
    return finish(records, out, summary)
