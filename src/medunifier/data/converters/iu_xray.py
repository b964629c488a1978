"""IU X-Ray (Indiana University / OpenI) -> manifest (one record per report).

Two official layouts are read:
- OpenI: `ecgen-radiology/N.xml` reports (a folder, or the `NLMCXR_reports.tgz` archive itself, read
  without extracting) with `AbstractText Label="FINDINGS"` / `"IMPRESSION"` and `parentImage id=...`
  links, plus a PNG folder (`images`, files `CXR1_1_IM-0001-3001.png`, as in `NLMCXR_png.tgz`).
  OpenI has no official split: a seeded 7:1:2 split by report (the R2Gen ratio) is drawn.
- R2Gen: `annotation.json` = {"train": [{"id", "report", "image_path": [...], "split"}], "val": ..., "test": ...}
  with the images under `images/`; the splits are R2Gen's and `report` is the findings section.
The view of an IU image is not recorded; the first listed image that exists is used (usually the
frontal one). Without images, `keep_text_only` keeps text-only records (image null) for tokenizer
training. Labels come from `medunifier.data.labeler` when it is available.
"""

from __future__ import annotations

import json
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medunifier.data.converters.common import (
    ConversionError,
    ConversionSummary,
    Deduplicator,
    ImageWriter,
    assign_splits,
    clean_text,
    compose_text,
    finish,
    report_labeler,
)
from medunifier.data.manifest import Record

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def parse_openi_xml(data: bytes | str, fallback_id: str = "") -> dict[str, Any]:
    """One OpenI report: {"id", "findings", "impression", "indication", "comparison", "image_ids", "mesh"}."""
    root = ET.fromstring(data)
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        if label and label not in sections:
            sections[label] = clean_text("".join(node.itertext()))
    uid = root.find("uId")
    return {
        "id": (uid.get("id") if uid is not None else None) or fallback_id,
        "findings": sections.get("FINDINGS"),
        "impression": sections.get("IMPRESSION"),
        "indication": sections.get("INDICATION"),
        "comparison": sections.get("COMPARISON"),
        "image_ids": [node.get("id") for node in root.findall("parentImage") if node.get("id")],
        "mesh": [clean_text(node.text) for node in root.iter("major") if clean_text(node.text)],
    }


def _xml_sources(root: Path) -> Iterator[tuple[str, bytes]]:
    """(file stem, XML bytes) from a .tgz/.tar, a folder with ecgen-radiology/, or a folder of .xml."""
    if root.is_file():
        with tarfile.open(root) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".xml"):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield Path(member.name).stem, handle.read()
        return
    folder = root / "ecgen-radiology" if (root / "ecgen-radiology").is_dir() else root
    files = sorted(folder.glob("*.xml"))
    if files:
        for path in files:
            yield path.stem, path.read_bytes()
        return
    archives = sorted(root.glob("*.tgz")) + sorted(root.glob("*.tar.gz"))
    if not archives:
        raise ConversionError(f"{root}: no annotation.json, ecgen-radiology/*.xml, *.xml or *.tgz found")
    yield from _xml_sources(archives[0])


def _number(record_id: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", record_id)
    return (int(digits[0]) if digits else -1, record_id)


def convert_iu_xray(root: Path, out: Path, *, images: Path | None = None, keep_text_only: bool = False,
                    require_findings: bool = False, val_fraction: float = 0.1, test_fraction: float = 0.2,
                    image_size: int | None = None, square: bool = False, min_size: int = 32,
                    seed: int = 0) -> ConversionSummary:
    """Convert IU X-Ray (OpenI XML, its .tgz, or R2Gen annotation.json); reports with images, or text only.

    Reports with empty FINDINGS and IMPRESSION are dropped; `require_findings` also drops those
    without FINDINGS (the R2Gen convention). `val_fraction` / `test_fraction` / `seed` make the
    split of the OpenI layout.
    """
    root, out = Path(root), Path(out)
    if not root.exists():
        raise ConversionError(f"{root}: not found")
    summary = ConversionSummary("iu-xray", str(out))
    r2gen = root.is_dir() and (root / "annotation.json").is_file()
    if images is None and root.is_dir() and (root / "images").is_dir():
        images = root / "images"
    if images is not None and not Path(images).is_dir():
        raise ConversionError(f"image folder {images} not found")
    if images is None and not keep_text_only:
        raise ConversionError("no image folder: pass --images DIR (the IU X-Ray PNGs) or --keep-text-only")
    images = Path(images) if images is not None else None

    if r2gen:
        reports = _read_r2gen(root / "annotation.json")
    else:
        reports = [parse_openi_xml(data, fallback_id=stem) for stem, data in _xml_sources(root)]
        reports.sort(key=lambda r: _number(r["id"]))
        splits = assign_splits([r["id"] for r in reports], val_fraction, test_fraction, seed)
        for report in reports:
            report["split"] = splits[report["id"]]
            report["image_paths"] = report["image_ids"]

    labeler = report_labeler()
    if labeler is None:
        summary.notes.append("medunifier.data.labeler is not available: records have no labels")
    writer = ImageWriter(out, summary, image_size, square, min_size)
    dedup = Deduplicator(summary)
    records = []
    for report in reports:
        findings, impression = report["findings"], report["impression"]
        if not findings and not impression:
            summary.filtered["empty_report"] += 1
            continue
        if require_findings and not findings:
            summary.filtered["empty_findings"] += 1
            continue
        if not dedup.first(report["id"]):
            continue
        image = None
        if images is not None and report["image_paths"]:
            image = _first_image(writer, images, report["image_paths"], summary)
        if image is None:
            if not keep_text_only:
                summary.text_only_dropped += 1
                continue
            summary.text_only_kept += 1
        text = compose_text(findings, impression)
        records.append(Record(
            id=report["id"], image=image, text=text, findings=findings, impression=impression,
            labels=labeler(text) if labeler is not None else {}, split=report["split"], modality="cxr",
            task="report", source="iu-xray", image_ids=report.get("image_ids"), mesh=report.get("mesh"),
        ))
    return finish(records, out, summary)


def _read_r2gen(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected {{'train': [...], 'val': [...], 'test': [...]}}")
    reports = []
    for key, items in data.items():
        split = {"train": "train", "val": "val", "valid": "val", "validate": "val", "test": "test"}.get(key)
        if split is None:
            continue
        for item in items:
            paths = list(item.get("image_path") or [])
            reports.append({
                "id": str(item["id"]), "findings": clean_text(item.get("report")), "impression": None,
                "split": split, "image_paths": paths, "image_ids": [Path(p).as_posix() for p in paths],
            })
    return reports


def _first_image(writer: ImageWriter, images: Path, paths: list[str], summary: ConversionSummary) -> str | None:
    """Write the first of a report's images that exists and reads; a missing set is reported once."""
    existing = []
    for name in paths:
        candidates = [images / name] if Path(name).suffix else [images / f"{name}{s}" for s in IMAGE_SUFFIXES]
        existing += [c for c in candidates if c.is_file()]
    for source in existing:
        image = writer.write(source, source.relative_to(images).with_suffix("").as_posix())
        if image is not None:
            return image
    if not existing:
        first = paths[0] if Path(paths[0]).suffix else f"{paths[0]}.png"
        summary.missing_images.append(str(images / first))
    return None
