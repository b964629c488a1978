"""SIIM-ACR Pneumothorax Segmentation -> manifest: image-level pneumothorax label and a caption.

Official layout under ROOT: `train-rle.csv` (header `ImageId, EncodedPixels`; one row per mask,
EncodedPixels "-1" = no pneumothorax; `stage_2_train.csv` of the stage-2 release is read the same
way) and the DICOMs anywhere below ROOT (`dicom-images-train/STUDY/SERIES/IMAGE_ID.dcm`), found
by file name (the SOPInstanceUID). A seeded train/val/test split of the images is drawn.
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


def convert_siim(root: Path, out: Path, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 image_size: int | None = None, square: bool = False, min_size: int = 32,
                 seed: int = 0) -> ConversionSummary:
    """Convert SIIM-ACR: one record per image, pneumothorax = any mask, `masks` = number of masks."""
    start = time.perf_counter()
    root, out = Path(root), Path(out)
    summary = ConversionSummary("siim", str(out))
    rle_file = find_file(root, ["train-rle.csv", "stage_2_train.csv"])
    if rle_file is None:
        raise ConversionError(f"{root}: train-rle.csv not found (is this the SIIM-ACR folder?)")
    masks: dict[str, int] = {}
    for row in iter_csv(rle_file):
        encoded = row.get("EncodedPixels", "").strip()
        masks[row["ImageId"]] = masks.get(row["ImageId"], 0) + (encoded not in ("-1", ""))
    dicoms = {path.stem: path for path in sorted(root.rglob("*.dcm"))}
    splits = assign_splits(masks, val_fraction, test_fraction, seed)

    writer = ImageWriter(out, summary, image_size, square, min_size)
    records = []
    for image_id, n_masks in masks.items():
        source = dicoms.get(image_id)
        if source is None:
            summary.missing_images.append(f"{root}/**/{image_id}.dcm")
            continue
        image = writer.write(source, image_id)
        if image is None:
            continue
        labels = {"pneumothorax": int(n_masks > 0)}
        records.append(Record(
            id=image_id, image=image, text=caption_from_labels(labels, record_rng(seed, image_id)),
            labels=labels, split=splits[image_id], modality="cxr", task="caption", source="siim",
            masks=n_masks,
        ))
    summary.seconds = time.perf_counter() - start
    return finish(records, out, summary)
