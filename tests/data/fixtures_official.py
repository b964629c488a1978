"""Miniature copies of public datasets in their exact official layouts (a few rows, tiny images).

Each `make_*` writes one dataset under a folder and returns what a test needs to check the
conversion (which ids should survive, which files are missing or broken).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def gradient(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 left-to-right ramp plus a little noise: not constant, so its conversion can be checked."""
    ramp = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    noise = np.random.default_rng(seed).integers(0, 8, size=(height, width))
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def write_image(path: Path, height: int = 40, width: int = 48, seed: int = 0, rgb: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = gradient(height, width, seed)
    img = Image.fromarray(pixels)
    if rgb:
        img = img.convert("RGB")
    img.save(path)
    return path


def write_dicom(path: Path, height: int = 48, width: int = 64, sop_uid: str | None = None, view: str = "PA") -> Path:
    """A 16-bit MONOCHROME2 CR DICOM with proper file meta; pixels are a 12-bit ramp (0..4000)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CR"
    ds.ViewPosition = view
    ds.PatientID = "anon"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ramp = (gradient(height, width).astype(np.int64) * 4000 // 255).astype(np.uint16)
    ds.PixelData = ramp.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]], header_line: str | None = None) -> Path:
    """Write a CSV (gzip when the name ends in .gz); `header_line` writes the header verbatim."""
    buffer = io.StringIO()
    if header_line is not None:
        buffer.write(header_line + "\n")
    writer = csv.writer(buffer, lineterminator="\n")
    if header_line is None:
        writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(buffer.getvalue())
    else:
        path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- MIMIC-CXR

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 The heart is mildly enlarged.  There is no focal consolidation,
 pleural effusion or pneumothorax.

 IMPRESSION:

 Mild cardiomegaly.  No acute cardiopulmonary process.
"""
MIMIC_FINDINGS = ("The heart is mildly enlarged. There is no focal consolidation, pleural effusion or "
                  "pneumothorax.")
MIMIC_IMPRESSION = "Mild cardiomegaly. No acute cardiopulmonary process."

# (dicom_id, subject, study, split, view, image written?)
MIMIC_IMAGES = [
    ("d1", "10000001", "50000001", "train", "PA", True),
    ("d2", "10000001", "50000001", "train", "LATERAL", True),
    ("d3", "10000001", "50000002", "validate", "AP", True),
    ("d4", "10000002", "50000003", "test", "PA", True),  # its report has no findings / impression
    ("d5", "10000002", "50000004", "train", "PA", False),  # image missing
    ("d6", "10000003", "50000005", "train", "AP", True),
    ("d7", "10000003", "50000005", "train", "PA", True),
]


def make_mimic_cxr(root: Path) -> Path:
    """MIMIC-CXR-JPG 2.0.0 with reports in the same root."""
    split_rows = [[d, study, subject, split] for d, subject, study, split, _, _ in MIMIC_IMAGES]
    split_rows.append(split_rows[0])  # a duplicate dicom id
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns"],
              [[d, subject, study, "CHEST (PA AND LAT)", view, 40, 48] for d, subject, study, _, view, _ in MIMIC_IMAGES])
    labels = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
              "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
              "Fracture", "Support Devices"]
    first = {name: "" for name in labels} | {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"}
    second = {name: "" for name in labels} | {"No Finding": "1.0"}
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *labels],
              [["10000001", "50000001", *first.values()], ["10000001", "50000002", *second.values()]])
    reports = {
        "50000001": MIMIC_REPORT,
        "50000002": " FINDINGS:  Lungs are clear.\n\n IMPRESSION:  Normal chest.\n",
        "50000003": " INDICATION:  cough\n\n COMPARISON:  None.\n",
        "50000004": " IMPRESSION:  No change.\n",
        "50000005": "\n Portable chest radiograph.\n\n Stable support devices. No pneumothorax.\n",  # no headers
    }
    for k, (dicom, subject, study, _, _, exists) in enumerate(MIMIC_IMAGES):
        study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        if exists:
            write_image(study_dir / f"{dicom}.jpg", seed=k)
        study_dir.with_suffix(".txt").write_text(reports[study], encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------- IU X-Ray

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <uId id="CXR{n}"/>
   <MedlineCitation><Article><Abstract>
      <AbstractText Label="COMPARISON">None.</AbstractText>
      <AbstractText Label="INDICATION">Cough</AbstractText>
      <AbstractText Label="FINDINGS">{findings}</AbstractText>
      <AbstractText Label="IMPRESSION">{impression}</AbstractText>
   </Abstract></Article></MedlineCitation>
   <MeSH><major>{mesh}</major></MeSH>
   {images}
</eCitation>
"""


def make_iu_xray(root: Path) -> tuple[Path, Path]:
    """OpenI XML reports (ecgen-radiology/) and a PNG folder; returns (root, images)."""
    reports = [
        (1, "The heart is normal in size. The lungs are clear.", "Normal chest.", ["CXR1_1_IM-0001-3001",
                                                                                   "CXR1_1_IM-0001-4001"]),
        (2, "", "", ["CXR2_1_IM-0652-1001"]),  # empty report
        (3, "Small left pleural effusion.", "Effusion.", ["CXR3_1_IM-1384-1001"]),  # image missing
        (4, "", "No acute disease.", ["CXR4_IM-2050-1001"]),  # impression only
    ]
    for n, findings, impression, image_ids in reports:
        images = "\n".join(f'<parentImage id="{i}"><caption>Xray Chest PA and Lateral</caption></parentImage>'
                           for i in image_ids)
        xml = IU_XML.format(n=n, findings=findings, impression=impression, mesh="normal", images=images)
        (root / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
        (root / "ecgen-radiology" / f"{n}.xml").write_text(xml, encoding="utf-8")
    images = root.parent / "NLMCXR_png"
    write_image(images / "CXR1_1_IM-0001-3001.png", seed=1)
    write_image(images / "CXR1_1_IM-0001-4001.png", seed=2)
    write_image(images / "CXR2_1_IM-0652-1001.png", seed=3)
    write_image(images / "CXR4_IM-2050-1001.png", seed=4)
    return root, images


def make_r2gen(root: Path) -> Path:
    """R2Gen's iu_xray layout: annotation.json and images/ID/0.png, 1.png."""
    data = {"train": [], "val": [], "test": []}
    for k, split in enumerate(["train", "train", "val", "test"]):
        study = f"CXR{100 + k}_IM-{k:04d}"
        paths = [f"{study}/0.png", f"{study}/1.png"]
        data[split].append({"id": study, "report": f"the lungs are clear . case {k} .", "image_path": paths,
                            "split": split})
        for j, rel in enumerate(paths):
            if not (k == 3 and j == 0):  # the test study lacks its first image: the second one is used
                write_image(root / "images" / rel, seed=10 * k + j)
    (root / "annotation.json").write_text(json.dumps(data), encoding="utf-8")
    return root


# --------------------------------------------------------------------------------------- CheXpert

CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                    "Support Devices"]
COMPETITION = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "consolidation": "Consolidation",
               "edema": "Edema", "pleural_effusion": "Pleural Effusion"}


def _chexpert_row(path: str, view: str, values: dict[str, str]) -> list[str]:
    row = {c: "" for c in CHEXPERT_COLUMNS} | {"Path": path, "Sex": "Female", "Age": "63",
                                                "Frontal/Lateral": view, "AP/PA": "PA" if view == "Frontal" else ""}
    row |= values
    return [row[c] for c in CHEXPERT_COLUMNS]


def make_chexpert(parent: Path, per_finding: int = 3) -> dict[str, object]:
    """CheXpert-v1.0-small under `parent`: train.csv / valid.csv with Path relative to `parent`.

    Per competition finding `per_finding` exclusive frontal positives (one cardiomegaly image is
    missing), plus rows that the 5x200 rule must reject: a lateral one, two positives, an uncertain one.
    """
    root = parent / "CheXpert-v1.0-small"
    rows, patient = [], 0
    expected_5x200: dict[str, list[str]] = {}
    missing = []
    for name, column in COMPETITION.items():
        for k in range(per_finding):
            patient += 1
            rel = f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/view1_frontal.jpg"
            others = {c: "0.0" for c in COMPETITION.values() if c != column}
            rows.append(_chexpert_row(rel, "Frontal", {column: "1.0", **others}))
            if name == "cardiomegaly" and k == 0:
                missing.append(rel)
            else:
                write_image(parent / rel, seed=patient)
                expected_5x200.setdefault(name, []).append(rel)
    rejects = {
        "lateral": ("Lateral", {"Atelectasis": "1.0"}),
        "two_positives": ("Frontal", {"Edema": "1.0", "Consolidation": "1.0"}),
        "uncertain_other": ("Frontal", {"Edema": "1.0", "Cardiomegaly": "-1.0", "Support Devices": "1.0"}),
        "no_finding": ("Frontal", {"No Finding": "1.0"}),
    }
    reject_paths = {}
    for key, (view, values) in rejects.items():
        patient += 1
        rel = f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/view1_{view.lower()}.jpg"
        rows.append(_chexpert_row(rel, view, values))
        write_image(parent / rel, seed=patient)
        reject_paths[key] = rel
    write_csv(root / "train.csv", CHEXPERT_COLUMNS, rows)
    valid = []
    for k in range(2):
        rel = f"CheXpert-v1.0-small/valid/patient{64541 + k}/study1/view1_frontal.jpg"
        valid.append(_chexpert_row(rel, "Frontal", {"Pleural Effusion": "1.0" if k == 0 else "0.0"}))
        write_image(parent / rel, seed=100 + k)
    write_csv(root / "valid.csv", CHEXPERT_COLUMNS, valid)
    return {"root": root, "expected_5x200": expected_5x200, "missing": missing, "rejects": reject_paths,
            "train_rows": len(rows)}


# -------------------------------------------------------------------------------------- RSNA, SIIM


def make_rsna(root: Path) -> Path:
    """stage_2_train_labels.csv + stage_2_train_images/*.dcm; p3 has no image, p4's DICOM is broken."""
    rows = [["p1", 10, 12, 20, 16, 1], ["p1", 30, 12, 18, 20, 1], ["p2", "", "", "", "", 0],
            ["p3", "", "", "", "", 0], ["p4", 5, 5, 10, 10, 1]]
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"],
              [["p1", "Lung Opacity"], ["p1", "Lung Opacity"], ["p2", "Normal"], ["p3", "Normal"],
               ["p4", "Lung Opacity"]])
    write_dicom(root / "stage_2_train_images" / "p1.dcm")
    write_dicom(root / "stage_2_train_images" / "p2.dcm", view="AP")
    (root / "stage_2_train_images" / "p4.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    return root


SIIM_IDS = ("1.2.276.0.7230010.3.1.4.1", "1.2.276.0.7230010.3.1.4.2", "1.2.276.0.7230010.3.1.4.3")


def make_siim(root: Path) -> Path:
    """train-rle.csv (header 'ImageId, EncodedPixels', as published) + nested DICOMs; the third is absent."""
    lines = [f"{SIIM_IDS[0]}, -1", f"{SIIM_IDS[1]}, 175349 7 1013 12 1009", f"{SIIM_IDS[1]}, 407576 2 1021 7",
             f"{SIIM_IDS[2]}, -1"]
    (root).mkdir(parents=True, exist_ok=True)
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\n" + "\n".join(lines) + "\n", encoding="utf-8")
    for k, uid in enumerate(SIIM_IDS[:2]):
        study = f"1.2.276.0.7230010.3.1.2.{k}"
        write_dicom(root / "dicom-images-train" / study / f"{study}.1" / f"{uid}.dcm", sop_uid=uid)
    return root


# ----------------------------------------------------------------------------------------- COVIDx


def make_covidx(root: Path) -> Path:
    """train.txt / test.txt ('patient_id filename class source') + train/ and test/ images."""
    (root / "train.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text(
        "101 a.png positive rsna\n"
        "102 b.jpg negative sirm\n"
        "103 c.png COVID-19 cohen\n"
        "104 a.png positive rsna\n"  # duplicate file name
        "105 e.png strange_class cohen\n"
        "truncated-line\n", encoding="utf-8")
    (root / "test.txt").write_text("201 d.png normal cohen\n202 tiny.png pneumonia cohen\n", encoding="utf-8")
    write_image(root / "train" / "a.png", seed=1)
    write_image(root / "train" / "b.jpg", seed=2, rgb=True)
    write_image(root / "train" / "c.png", seed=3)
    write_image(root / "train" / "e.png", seed=5)
    write_image(root / "test" / "d.png", seed=4)
    write_image(root / "test" / "tiny.png", height=12, width=12)
    return root


# ---------------------------------------------------------------------------------- VQA-RAD, SLAKE


def make_vqa_rad(root: Path) -> Path:
    """trainset.json + testset.json + images/; one question points to a missing image."""
    train = [
        {"qid": 1, "image_name": "synpic1.jpg", "image_organ": "CHEST", "answer": "Yes", "answer_type": "CLOSED",
         "question_type": "PRES", "question": "Is there a pneumothorax?", "phrase_type": "freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "image_organ": "CHEST", "answer": "Chest X-ray",
         "answer_type": "OPEN", "question_type": "MODALITY", "question": "What type of image is this?",
         "phrase_type": "freeform"},
        {"qid": 3, "image_name": "synpic2.jpg", "image_organ": "HEAD", "answer": 2, "answer_type": "CLOSED ",
         "question_type": "COUNT", "question": "How many lesions?", "phrase_type": "para"},
        {"qid": 4, "image_name": "synpic_missing.jpg", "image_organ": "ABD", "answer": "no",
         "answer_type": "CLOSED", "question_type": "PRES", "question": "Is there free air?",
         "phrase_type": "freeform"},
    ]
    test = [{"qid": 1, "image_name": "synpic2.jpg", "image_organ": "HEAD", "answer": "yes", "answer_type": "CLOSED",
             "question_type": "MODALITY", "question": "Is this an MRI?", "phrase_type": "test_freeform"}]
    root.mkdir(parents=True, exist_ok=True)
    (root / "trainset.json").write_text(json.dumps(train), encoding="utf-8")
    (root / "testset.json").write_text(json.dumps(test), encoding="utf-8")
    write_image(root / "images" / "synpic1.jpg", 60, 80, seed=1, rgb=True)
    write_image(root / "images" / "synpic2.jpg", 64, 64, seed=2, rgb=True)
    return root


def make_slake(root: Path) -> Path:
    """Slake1.0: train / validate / test json (English and Chinese questions) + imgs/xmlabN/source.jpg."""
    def item(qid: int, img: int, lang: str, modality: str, location: str) -> dict[str, object]:
        question = "Is the lung healthy?" if lang == "en" else "肺部健康吗?"
        return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question,
                "answer": "Yes" if lang == "en" else "是", "q_lang": lang, "location": location,
                "modality": modality, "answer_type": "CLOSED", "base_type": "vqa", "content_type": "Abnormality",
                "triple": ["vhead", "_", "_"], "qid": qid}
    root.mkdir(parents=True, exist_ok=True)
    tables = {
        "train.json": [item(0, 0, "en", "X-Ray", "Chest_lung"), item(1, 0, "zh", "X-Ray", "Chest_lung"),
                       item(2, 1, "en", "CT", "Abdomen")],
        "validate.json": [item(3, 2, "en", "MRI", "Brain_Tissue")],
        "test.json": [item(4, 1, "en", "CT", "Abdomen"), item(5, 1, "zh", "CT", "Abdomen")],
    }
    for name, items in tables.items():
        (root / name).write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    for img in range(3):
        write_image(root / "imgs" / f"xmlab{img}" / "source.jpg", 48, 48, seed=img, rgb=True)
    return root


# --------------------------------------------------------------------------------------- MedMNIST


def make_medmnist(path: Path, n_classes: int, multi_label: bool = False, rgb: bool = False,
                  counts: tuple[int, int, int] = (12, 4, 4), size: int = 28) -> Path:
    """An npz with the official array names and shapes: images (N, H, W[, 3]) uint8, labels (N, 1) or (N, C)."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), counts):
        shape = (n, size, size, 3) if rgb else (n, size, size)
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if multi_label:
            arrays[f"{split}_labels"] = (rng.random((n, n_classes)) < 0.2).astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(n) % n_classes).reshape(n, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path
