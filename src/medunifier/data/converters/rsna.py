"""RSNA Pneumonia Detection Challenge (stage 2) -> manifest: image-level pneumonia label and a caption.

Official layout under ROOT:
  stage_2_train_labels.csv        patientId, x, y, width, height, Target (one row per box; Target 0 = no box)
  stage_2_train_images/ID.dcm     one frontal DICOM per patientId
  stage_2_detailed_class_info.csv optional: patientId, class ("Lung Opacity", "Normal", "No Lung Opacity / Not Normal")
The test images have no public labels, so a seeded train/val/test split of the labelled patients is drawn.
"""

from __future__ import annotations

from pathlib import Path

from medunifier.data.converters import common
from medunifier.data.converters.common import ConversionSummary


def convert_rsna(root: Path, out: Path, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 image_size: int | None = None, square: bool = False, min_size: int = 32,
                 seed: int = 0) -> ConversionSummary:
    """Convert RSNA Pneumonia: one record per patient image, label pneumonia = any box, boxes kept."""
    root, out = Path(root), Path(out)
    summary = ConversionSummary("rsna", str(out))
    label_file = common.require_file(root, ["stage_2_train_labels.csv", "stage_1_train_labels.csv"],
                                     "stage_2_train_labels.csv not found (is this the RSNA Pneumonia folder?)")
    image_dir = next((d for d in (root / "stage_2_train_images", root / "stage_1_train_images") if d.is_dir()),
                     root / "stage_2_train_images")
    class_file = common.find_file(root, ["stage_2_detailed_class_info.csv", "stage_1_detailed_class_info.csv"])
    classes = {r["patientId"]: r["class"] for r in common.iter_csv(class_file)} if class_file else {}

    # One row per box (Target 1) or a single Target-0 row; a patient is positive when any box exists.
    targets: dict[str, int] = {}
    boxes: dict[str, list[list[float]]] = {}
    for row in common.iter_csv(label_file):
        patient_id, target = row["patientId"], int(float(row["Target"]))
        targets[patient_id] = max(targets.get(patient_id, 0), target)
        boxes.setdefault(patient_id, [])
        if target == 1:
            boxes[patient_id].append([float(row[k]) for k in ("x", "y", "width", "height")])
    splits = common.assign_splits(targets, val_fraction, test_fraction, seed)

    writer = common.ImageWriter(out, summary, image_size, square, min_size)
    records = []
    for patient_id, target in targets.items():
        image = writer.write(image_dir / f"{patient_id}.dcm", patient_id)
        if image is None:
            continue
        records.append(common.caption_record(
            patient_id, image, {"pneumonia": target}, splits[patient_id], "rsna", seed,
            boxes=boxes[patient_id], rsna_class=classes.get(patient_id),
        ))
    return common.finish(records, out, summary)
