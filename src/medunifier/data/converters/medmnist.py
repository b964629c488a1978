"""MedMNIST v2 (2D) -> manifest: images to PNG, class labels to captions with several phrasings.

Any 2D MedMNIST `.npz` (arrays `train_images`, `train_labels`, `val_*`, `test_*`, whichever are
present; 28x28 or the larger MedMNIST+ sizes; grey (N, H, W) or colour (N, H, W, 3)). The dataset
is named by the file name (`pneumoniamnist.npz`, `pneumoniamnist_224.npz`, ...) or by `flag`.
Following UniMedVL's "observation" step each image becomes an image-caption pair: the caption is
drawn (seeded, per image) from several phrasings of its class; `labels` holds the classes one-hot
(multi-label for ChestMNIST) and `class_index` the original label.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medunifier.data.converters.captions import join_phrases
from medunifier.data.converters.common import (
    ConversionError,
    ConversionSummary,
    ImageWriter,
    finish,
    record_rng,
)
from medunifier.data.manifest import Record


@dataclass(frozen=True)
class MedMNISTInfo:
    """Caption vocabulary of one MedMNIST dataset; classes in the order of the official INFO labels."""

    image: str  # how the image is named in a caption ("chest X-ray")
    modality: str  # the manifest modality
    phrases: tuple[str, ...]  # each class as it reads in a sentence
    keys: tuple[str, ...]  # each class as a `labels` key (snake_case)
    style: str = "finding"  # "finding" (a diagnosis) or "content" (what the image shows: organ, cell, tissue)
    normal: int | None = None  # the class index that means "no abnormality", if any
    multi_label: bool = False


_ORGANS = ("the bladder", "the left femur", "the right femur", "the heart", "the left kidney", "the right kidney",
           "the liver", "the left lung", "the right lung", "the pancreas", "the spleen")
_ORGAN_KEYS = ("bladder", "femur_left", "femur_right", "heart", "kidney_left", "kidney_right", "liver",
               "lung_left", "lung_right", "pancreas", "spleen")

INFO: dict[str, MedMNISTInfo] = {
    "pathmnist": MedMNISTInfo(
        "colon pathology image", "pathology",
        ("adipose tissue", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
        ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle", "normal_colon_mucosa",
         "cancer_associated_stroma", "colorectal_adenocarcinoma_epithelium"), style="content"),
    "chestmnist": MedMNISTInfo(
        "chest X-ray", "cxr",
        ("atelectasis", "cardiomegaly", "pleural effusion", "infiltration", "a mass", "a nodule", "pneumonia",
         "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural thickening", "a hernia"),
        ("atelectasis", "cardiomegaly", "pleural_effusion", "infiltration", "mass", "nodule", "pneumonia",
         "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis", "pleural_thickening", "hernia"),
        multi_label=True),
    "dermamnist": MedMNISTInfo(
        "dermatoscopic image", "dermoscopy",
        ("actinic keratosis or intraepithelial carcinoma", "basal cell carcinoma", "a benign keratosis-like lesion",
         "dermatofibroma", "melanoma", "a melanocytic nevus", "a vascular lesion"),
        ("actinic_keratoses_and_intraepithelial_carcinoma", "basal_cell_carcinoma",
         "benign_keratosis_like_lesions", "dermatofibroma", "melanoma", "melanocytic_nevi", "vascular_lesions")),
    "octmnist": MedMNISTInfo(
        "retinal OCT scan", "oct", ("choroidal neovascularization", "diabetic macular edema", "drusen", "a normal retina"),
        ("choroidal_neovascularization", "diabetic_macular_edema", "drusen", "normal"), normal=3),
    "pneumoniamnist": MedMNISTInfo(
        "chest X-ray", "cxr", ("no pneumonia", "pneumonia"), ("no_finding", "pneumonia"), normal=0),
    "retinamnist": MedMNISTInfo(
        "fundus photograph", "fundus",
        ("no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
         "severe diabetic retinopathy", "proliferative diabetic retinopathy"),
        ("dr_grade_0", "dr_grade_1", "dr_grade_2", "dr_grade_3", "dr_grade_4"), normal=0),
    "breastmnist": MedMNISTInfo(
        "breast ultrasound image", "ultrasound", ("a malignant lesion", "normal tissue or a benign lesion"),
        ("malignant", "normal_or_benign")),
    "bloodmnist": MedMNISTInfo(
        "blood smear image", "microscopy",
        ("a basophil", "an eosinophil", "an erythroblast", "an immature granulocyte", "a lymphocyte", "a monocyte",
         "a neutrophil", "a platelet"),
        ("basophil", "eosinophil", "erythroblast", "immature_granulocytes", "lymphocyte", "monocyte", "neutrophil",
         "platelet"), style="content"),
    "tissuemnist": MedMNISTInfo(
        "kidney cortex microscopy image", "microscopy",
        ("collecting duct or connecting tubule cells", "distal convoluted tubule cells",
         "glomerular endothelial cells", "interstitial endothelial cells", "leukocytes", "podocytes",
         "proximal tubule segment cells", "thick ascending limb cells"),
        ("collecting_duct_connecting_tubule", "distal_convoluted_tubule", "glomerular_endothelial_cells",
         "interstitial_endothelial_cells", "leukocytes", "podocytes", "proximal_tubule_segments",
         "thick_ascending_limb"), style="content"),
    "organamnist": MedMNISTInfo("axial abdominal CT slice", "ct", _ORGANS, _ORGAN_KEYS, style="content"),
    "organcmnist": MedMNISTInfo("coronal abdominal CT slice", "ct", _ORGANS, _ORGAN_KEYS, style="content"),
    "organsmnist": MedMNISTInfo("sagittal abdominal CT slice", "ct", _ORGANS, _ORGAN_KEYS, style="content"),
}

FINDING_TEMPLATES = (
    "A {image} showing {cls}.",
    "{Image} with findings consistent with {cls}.",
    "The {image} demonstrates {cls}.",
    "{Image}: {cls}.",
    "This {image} is suggestive of {cls}.",
)
NORMAL_TEMPLATES = (
    "A normal {image}.",
    "{Image} without abnormal findings.",
    "The {image} shows no abnormality.",
    "{Image}: no abnormality detected.",
    "This {image} shows {cls}.",
)
CONTENT_TEMPLATES = (
    "A {image} of {cls}.",
    "{Image} showing {cls}.",
    "This {image} depicts {cls}.",
    "{Image}: {cls}.",
    "The {image} contains {cls}.",
)


def caption_for(info: MedMNISTInfo, classes: list[int], rng: random.Random) -> str:
    """One caption for the given class indices (several for multi-label; none = no finding)."""
    fill = {"image": info.image, "Image": info.image[:1].upper() + info.image[1:]}
    if not classes or (info.normal is not None and classes == [info.normal]):
        normal_phrase = info.phrases[info.normal] if info.normal is not None else "no findings"
        return rng.choice(NORMAL_TEMPLATES).format(cls=normal_phrase, **fill)
    templates = CONTENT_TEMPLATES if info.style == "content" else FINDING_TEMPLATES
    return rng.choice(templates).format(cls=join_phrases([info.phrases[c] for c in classes]), **fill)


def infer_flag(path: Path) -> str | None:
    """'pneumoniamnist_trainval.npz' -> 'pneumoniamnist' (a known name at the start of the file name)."""
    match = re.match(r"([a-z]+mnist)", path.name.lower())
    return match.group(1) if match and match.group(1) in INFO else None


def convert_medmnist(root: Path, out: Path, *, flag: str | None = None, image_size: int | None = None,
                     square: bool = False, min_size: int = 0, seed: int = 0) -> ConversionSummary:
    """Convert a MedMNIST npz (`root` is the file, or a folder holding one) to PNGs and captions."""
    root, out = Path(root), Path(out)
    if root.is_dir():
        files = sorted(root.glob("*.npz"))
        if len(files) != 1:
            raise ConversionError(f"{root}: expected one .npz file, found {len(files)}; pass the file itself")
        root = files[0]
    if not root.is_file():
        raise ConversionError(f"{root}: not found")
    flag = (flag or infer_flag(root) or "").lower()
    if flag not in INFO:
        raise ConversionError(f"cannot tell which MedMNIST dataset {root.name} is: pass --flag, one of {sorted(INFO)}")
    info = INFO[flag]
    summary = ConversionSummary(f"medmnist/{flag}", str(out))
    writer = ImageWriter(out, summary, image_size, square, min_size)
    records = []
    with np.load(root, allow_pickle=False) as data:
        splits = [s for s in ("train", "val", "test") if f"{s}_images" in data.files]
        if not splits:
            raise ConversionError(f"{root}: no train_images / val_images / test_images arrays")
        for split in splits:
            images = data[f"{split}_images"]  # (N, H, W) or (N, H, W, 3), uint8
            labels = data[f"{split}_labels"].reshape(len(images), -1)  # (N, 1) or (N, 14) multi-label
            if labels.shape[1] != (len(info.keys) if info.multi_label else 1) or labels.max() >= len(info.keys):
                raise ConversionError(f"{root}: {split}_labels of shape {labels.shape} (max {labels.max()}) "
                                      f"do not match {flag} ({len(info.keys)} classes)")
            for index in range(len(images)):
                record_id = f"{flag}-{split}-{index:05d}"
                image = writer.write_array(images[index], record_id)
                if image is None:
                    continue
                row = labels[index]
                classes = [int(c) for c in np.flatnonzero(row)] if info.multi_label else [int(row[0])]
                record_labels = {key: int(c in classes) for c, key in enumerate(info.keys)}
                records.append(Record(
                    id=record_id, image=image, text=caption_for(info, classes, record_rng(seed, record_id)),
                    labels=record_labels, split=split, modality=info.modality, task="caption",
                    source=f"medmnist/{flag}", class_index=classes if info.multi_label else classes[0],
                    class_name=", ".join(info.keys[c] for c in classes) or "no_finding",
                ))
    return finish(records, out, summary)
