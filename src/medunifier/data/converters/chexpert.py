"""CheXpert (v1.0 / v1.0-small) -> manifest: templated captions from the 14 labels, or the 5x200 set.

Official layout under ROOT: `train.csv`, `valid.csv` (and `test.csv` when present) with columns
Path, Sex, Age, Frontal/Lateral, AP/PA and the 14 labels (1.0 / 0.0 / -1.0 / blank); `Path` is
like `CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`, relative to ROOT's parent
(ROOT/train/... is tried too). CheXpert has no reports, so each image gets a caption made from
its labels (several phrasings, seeded).

The 5x200 set (GLoRIA / MedUnifier retrieval evaluation): frontal training images with exactly
one positive among the five competition findings (and no uncertain one among them), `per_class`
of each, sampled with a fixed seed; images that are missing or unreadable are replaced by the
next sampled candidate.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from medunifier.data.converters.common import (
    ConversionError,
    ConversionSummary,
    Deduplicator,
    ImageWriter,
    caption_record,
    check_uncertain,
    chexpert_labels,
    finish,
    iter_csv,
    iter_with_seed,
    parse_label,
    split_tables,
)
from medunifier.data.findings import COMPETITION_FINDINGS
from medunifier.data.manifest import Record

CSV_SPLITS = (("train.csv", "train"), ("valid.csv", "val"), ("test.csv", "test"))
COMPETITION_COLUMNS = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly",
                       "consolidation": "Consolidation", "edema": "Edema", "pleural_effusion": "Pleural Effusion"}


def _record_id(path: str) -> str:
    """'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg' -> 'train/patient00001/study1/view1_frontal'."""
    parts = PurePosixPath(path).with_suffix("").parts
    if len(parts) > 1 and parts[0].lower().startswith("chexpert"):
        parts = parts[1:]
    return "/".join(parts)


def _image_path(root: Path, path: str) -> Path:
    """The first existing of ROOT/../Path, ROOT/Path, ROOT/<Path without its first folder>."""
    parts = PurePosixPath(path).parts
    candidates = [root.parent / path, root / path]
    if len(parts) > 1:
        candidates.append(root.joinpath(*parts[1:]))
    return next((c for c in candidates if c.is_file()), candidates[-1])


def _is_frontal(row: dict[str, str]) -> bool | None:
    view = row.get("Frontal/Lateral", "").strip().lower()
    return None if not view else view == "frontal"


def convert_chexpert(root: Path, out: Path, *, uncertain: str = "keep", five_by_200: bool = False,
                     per_class: int = 200, image_size: int | None = None, square: bool = False,
                     min_size: int = 32, seed: int = 0) -> ConversionSummary:
    """Convert CheXpert: frontal images with captions and labels (uncertain: keep / zeros / ones / ignore).

    With `five_by_200`, write only the 5x200 evaluation set (`per_class` images per competition
    finding, split "test", one-hot labels over the five and a `class_name` field).
    """
    root, out = Path(root), Path(out)
    summary = ConversionSummary("chexpert-5x200" if five_by_200 else "chexpert", str(out))
    check_uncertain(uncertain)
    tables = split_tables(root, CSV_SPLITS, "no train.csv / valid.csv found (is this the CheXpert folder?)")
    writer = ImageWriter(out, summary, image_size, square, min_size)
    if five_by_200:
        records = _five_by_200(root, tables, writer, summary, per_class, seed)
    else:
        records = []
        dedup = Deduplicator(summary)
        for table, split in tables:
            for row in iter_csv(table):
                if _is_frontal(row) is False:
                    summary.filtered["non_frontal"] += 1
                    continue
                record_id = _record_id(row["Path"])
                if not dedup.first(record_id):
                    continue
                image = writer.write(_image_path(root, row["Path"]), record_id)
                if image is None:
                    continue
                labels = chexpert_labels(row, uncertain)
                records.append(_record(record_id, image, labels, split, row, seed))
    return finish(records, out, summary)


def _record(record_id: str, image: str, labels: dict[str, int], split: str, row: dict[str, str],
            seed: int, **extra: object) -> Record:
    age = row.get("Age", "")
    return caption_record(record_id, image, labels, split, "chexpert", seed, sex=row.get("Sex") or None,
                          age=int(float(age)) if age else None, view=row.get("AP/PA") or None, **extra)


def _five_by_200(root: Path, tables: list[tuple[Path, str]], writer: ImageWriter, summary: ConversionSummary,
                 per_class: int, seed: int) -> list[Record]:
    train = [t for t, split in tables if split == "train"]
    if not train:
        raise ConversionError(f"{root}: the 5x200 set is drawn from train.csv, which is missing")
    candidates: dict[str, list[dict[str, str]]] = {name: [] for name in COMPETITION_FINDINGS}
    for row in iter_csv(train[0]):
        if _is_frontal(row) is False:
            continue
        values = {name: parse_label(row.get(column)) for name, column in COMPETITION_COLUMNS.items()}
        positives = [name for name, v in values.items() if v == 1]
        if len(positives) == 1 and -1 not in values.values():
            candidates[positives[0]].append(row)
    records = []
    for k, name in enumerate(COMPETITION_FINDINGS):
        chosen = 0
        for row in iter_with_seed(candidates[name], seed + k):
            if chosen == per_class:
                break
            record_id = _record_id(row["Path"])
            image = writer.write(_image_path(root, row["Path"]), record_id)
            if image is None:
                continue
            labels = {other: int(other == name) for other in COMPETITION_FINDINGS}
            records.append(_record(record_id, image, labels, "test", row, seed, class_name=name))
            chosen += 1
        if chosen < per_class:
            summary.notes.append(f"5x200: only {chosen} usable images for {name} (asked for {per_class})")
    return records
