"""RSNA Pneumonia Detection Challenge (stage 2) -> manifest: image-level pneumonia label and a caption.

Official layout under ROOT:
  stage_2_train_labels.csv        patientId, x, y, width, height, Target (one row per box; Target 0 = no box)
  stage_2_train_images/ID.dcm     one frontal DICOM per patientId
  stage_2_detailed_class_info.csv optional: patientId, class ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal")
The test images have no public labels, so a seeded train/val/test split of the labelled patients is drawn.
"""

from __future__ import annotations

import time
from pathlib import Path

from medunifier.data.converters.captions import caption_from_labels
from medunifier.data.converters.common import (
    ConversionError,
    ConversionSummary,
    ImageWriter,
    assign_splits,
    find_file,
    finish,
    iter_csv,
    record_rng,
)
from medunifier.data.manifest import Record


def convert_rsna(root: Path, out: Path, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 image_size: int | None = None, square: bool = False, min_size: int = 32,
                 seed: int = 0) -> ConversionSummary:
    """Convert RSNA Pneumonia: one record per patient image, label pneumonia = any box, boxes kept."""
    start = time.perf_counter()
    root, out = Path(root), Path(out)
    summary = ConversionSummary("rsna", str(out))
    label_file = find_file(root, ["stage_2_train_labels.csv", "stage_1_train_labels.csv"])
    if label_file is None:
        raise ConversionError(f"{root}: stage_2_train_labels.csv not found (is this the RSNA Pneumonia folder?)")
    image_dir = next((d for d in (root / "stage_2_train_images", root / "stage_1_train_images") if d.is_dir()),
                     root / "stage_2_train_images")
    class_file = find_file(root, ["stage_2_detailed_class_info.csv", "stage_1_detailed_class_info.csv"])
    classes = {r["patientId"]: r["class"] for r in iter_csv(class_file)} if class_file else {}

    # One row per box (Target 1) or a single Target-0 row; a patient is positive when any box exists.
    targets: dict[str, int] = {}
    boxes: dict[str, list[list[float]]] = {}
    for row in iter_csv(label_file):
        patient_id, target = row["patientId"], int(float(row["Target"]))
        targets[patient_id] = max(targets.get(patient_id, 0), target)
        boxes.setdefault(patient_id, [])
        if target == 1:
            boxes[patient_id].append([float(row[k]) for k in ("x", "y", "width", "height")])
    splits = assign_splits(targets, val_fraction, test_fraction, seed)

    writer = ImageWriter(out, summary, image_size, square, min_size)
    records = []
    for patient_id, target in targets.items():
        image = writer.write(image_dir / f"{patient_id}.dcm", patient_id)
        if image is None:
            continue
        labels = {"pneumonia": target}
        records.append(Record(
            id=patient_id, image=image, text=caption_from_labels(labels, record_rng(seed, patient_id)),
            labels=labels, split=splits[patient_id], modality="cxr", task="caption", source="rsna",
            boxes=boxes[patient_id], rsna_class=classes.get(patient_id),
        ))
    summary.seconds = time.perf_counter() - start
    return finish(records, out, summary)
