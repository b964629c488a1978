"""SIIM-ACR Pneumothorax Segmentation -> manifest: image-level pneumothorax label and a caption.

Official layout under ROOT: `train-rle.csv` (header `ImageId, EncodedPixels`; one row per mask,
EncodedPixels "-1" = no pneumothorax; `stage_2_train.csv` of the stage-2 release is read the same
way) and the DICOMs anywhere below ROOT (`dicom-images-train/STUDY/SERIES/IMAGE_ID.dcm`), found
by file name (the SOPInstanceUID). A seeded train/val/test split of the images is drawn.
"""

from __future__ import annotations

from pathlib import Path

from medunifier.data.converters import common
from medunifier.data.converters.common import ConversionSummary


def convert_siim(root: Path, out: Path, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 image_size: int | None = None, square: bool = False, min_size: int = 32,
                 seed: int = 0) -> ConversionSummary:
    """Convert SIIM-ACR: one record per image, pneumothorax = any mask, `masks` = number of masks."""
    root, out = Path(root), Path(out)
    summary = ConversionSummary("siim", str(out))
    rle_file = common.require_file(root, ["train-rle.csv", "stage_2_train.csv"],
                                   "train-rle.csv not found (is this the SIIM-ACR folder?)")
    masks: dict[str, int] = {}
    for row in common.iter_csv(rle_file):
        encoded = row.get("EncodedPixels", "").strip()
        masks[row["ImageId"]] = masks.get(row["ImageId"], 0) + (encoded not in ("-1", ""))
    dicoms = {path.stem: path for path in sorted(root.rglob("*.dcm"))}
    splits = common.assign_splits(masks, val_fraction, test_fraction, seed)

    writer = common.ImageWriter(out, summary, image_size, square, min_size)
    records = []
    for image_id, n_masks in masks.items():
        source = dicoms.get(image_id)
        if source is None:
            summary.missing_images.append(f"{root}/**/{image_id}.dcm")
            continue
        image = writer.write(source, image_id)
        if image is None:
            continue
        records.append(common.caption_record(
            image_id, image, {"pneumothorax": int(n_masks > 0)}, splits[image_id], "siim", seed, masks=n_masks,
        ))
    return common.finish(records, out, summary)
