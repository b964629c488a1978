"""Dataset converters: real VQA-RAD, PneumoniaMNIST and IU X-Ray reports; miniature official layouts for the rest."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.data.converters import CONVERTERS, ConversionError, convert
from medunifier.data.converters.captions import caption_from_labels
from medunifier.data.converters.common import assign_splits
from medunifier.data.converters.iu_xray import parse_openi_xml
from medunifier.data.converters.reports import findings_and_impression
from medunifier.data.converters.vqa_rad import infer_modality
from medunifier.data.findings import COMPETITION_FINDINGS
from medunifier.data.manifest import read_manifest

try:
    import fixtures_official as fx
except ImportError:  # tests/ imported as a package
    from tests.data import fixtures_official as fx


def load(out: Path) -> dict[str, dict]:
    """Records of out/manifest.jsonl by id, validated by the manifest reader."""
    records, report = read_manifest(out / "manifest.jsonl", strict=True)
    assert report.skipped == 0
    return {r.id: r.model_dump() for r in records}


def png_size(out: Path, record: dict) -> tuple[int, int]:
    with Image.open(out / record["image"]) as img:
        return img.size


def test_every_format_is_registered():
    assert set(CONVERTERS) == {"mimic-cxr", "iu-xray", "chexpert", "rsna", "siim", "covidx", "vqa-rad", "slake",
                               "medmnist", "ixi"}


# ------------------------------------------------------------------------------------------ parts


def test_report_sections_like_the_mimic_parser():
    findings, impression = findings_and_impression(fx.MIMIC_REPORT)
    assert findings == fx.MIMIC_FINDINGS
    assert impression == fx.MIMIC_IMPRESSION
    # No headers at all: the last paragraph stands in for the findings.
    assert findings_and_impression("FINAL REPORT\n\nPortable view.\n\nLungs are clear.\n") == ("Lungs are clear.", None)
    # Only other sections: nothing.
    assert findings_and_impression(" INDICATION: cough\n\n COMPARISON: None.\n") == (None, None)
    # "FINDINGS AND IMPRESSION:" counts as findings.
    assert findings_and_impression("FINDINGS AND IMPRESSION: No effusion.")[0] == "No effusion."


def test_seeded_split_is_stable_and_proportional():
    keys = [f"k{i}" for i in range(1000)]
    first = assign_splits(keys, 0.1, 0.2, seed=3)
    assert first == assign_splits(reversed(keys), 0.1, 0.2, seed=3)
    assert first != assign_splits(keys, 0.1, 0.2, seed=4)
    assert Counter(first.values()) == {"train": 700, "val": 100, "test": 200}
    with pytest.raises(ConversionError):
        assign_splits(keys, 0.6, 0.5, seed=0)


def test_captions_from_labels_vary_and_say_what_is_present():
    labels = {"cardiomegaly": 1, "pleural_effusion": 1, "edema": 0}
    captions = {caption_from_labels(labels, random.Random(s)) for s in range(40)}
    assert len(captions) >= 3
    assert all("cardiomegaly and pleural effusion" in c.lower() for c in captions)
    assert all("edema" not in c.lower() for c in captions)  # negatives are not mentioned beside positives
    negative = caption_from_labels({"pneumothorax": 0}, random.Random(0))
    assert "pneumothorax" in negative.lower() and negative.lower().startswith(("no ", "there is no"))
    hedged = caption_from_labels({"edema": -1}, random.Random(1)).lower()
    assert "edema" in hedged and any(w in hedged for w in ("possible", "cannot be excluded", "may represent"))


def test_vqa_modality_from_its_own_questions():
    def qa(question, answer):
        return {"question": question, "answer": answer}
    assert infer_modality([qa("Is this a CT image?", "yes")], "head") == "ct"
    assert infer_modality([qa("Is this a CT image?", "no")], "head") == "radiology"
    assert infer_modality([qa("Is there a pneumothorax?", "no")], "chest") == "cxr"  # VQA-RAD's chest images
    assert infer_modality([], "abdomen") == "ct"
    assert infer_modality([qa("What type of imaging is this?", "MRI Diffusion Weighted")], "head") == "mri"
    assert infer_modality([qa("What is the modality?", "CXR")], "chest") == "cxr"
    assert infer_modality([qa("How was this image taken?", "X-ray")], "abdomen") == "xray"


# ------------------------------------------------------------------------------------- MIMIC-CXR


def test_mimic_cxr_official_layout(tmp_path: Path):
    root = fx.make_mimic_cxr(tmp_path / "mimic")
    summary = convert("mimic-cxr", root, tmp_path / "out", image_size=32)
    records = load(tmp_path / "out")
    # d2 is lateral, d4's report is empty, d5's image is missing.
    assert set(records) == {"d1", "d3", "d6", "d7"}
    assert summary.filtered == {"non_frontal": 1, "empty_report": 1, "duplicate_id": 1}
    assert summary.missing_images == [str(root / "files/p10/p10000002/s50000004/d5.jpg")]
    assert summary.text_only_dropped == 1
    assert summary.splits == {"train": 3, "val": 1}
    d1 = records["d1"]
    assert d1["findings"] == fx.MIMIC_FINDINGS and d1["impression"] == fx.MIMIC_IMPRESSION
    assert d1["text"] == f"FINDINGS: {fx.MIMIC_FINDINGS} IMPRESSION: {fx.MIMIC_IMPRESSION}"
    assert d1["labels"] == {"cardiomegaly": 1, "edema": -1, "pleural_effusion": 0}
    assert records["d3"]["labels"] == {"no_finding": 1} and records["d3"]["split"] == "val"
    assert records["d6"]["findings"] == "Stable support devices. No pneumothorax."  # last paragraph
    assert d1["view"] == "PA" and d1["study_id"] == "50000001" and d1["source"] == "mimic-cxr"
    assert png_size(tmp_path / "out", d1) == (38, 32)  # 48x40 -> short side 32
    assert json.loads((tmp_path / "out" / "conversion.json").read_text())["records"] == 4


def test_mimic_cxr_options(tmp_path: Path):
    root = fx.make_mimic_cxr(tmp_path / "mimic")
    summary = convert("mimic-cxr", root, tmp_path / "a", one_per_study=True, uncertain="zeros",
                      keep_text_only=True)
    records = load(tmp_path / "a")
    assert set(records) == {"d1", "d3", "d5", "d7"}  # d7 is the PA of study 50000005; d5 kept text-only
    assert records["d5"]["image"] is None and summary.text_only_kept == 1
    assert summary.filtered["extra_view"] == 1
    assert records["d1"]["labels"]["edema"] == 0
    # Reports in a separate root.
    reports = tmp_path / "reports"
    for txt in root.glob("files/*/*/*.txt"):
        target = reports / txt.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(txt, target)
    summary = convert("mimic-cxr", root, tmp_path / "b")
    assert summary.records == 0 and summary.filtered["missing_report"] == 6  # frontal images
    summary = convert("mimic-cxr", root, tmp_path / "c", reports_root=reports, uncertain="ignore")
    assert summary.records == 4 and "edema" not in load(tmp_path / "c")["d1"]["labels"]
    with pytest.raises(ConversionError, match="uncertain"):
        convert("mimic-cxr", root, tmp_path / "d", uncertain="maybe")


# -------------------------------------------------------------------------------------- IU X-Ray


def test_iu_xray_xml_with_images(tmp_path: Path):
    root, images = fx.make_iu_xray(tmp_path / "iu")
    summary = convert("iu-xray", root, tmp_path / "out", images=images, val_fraction=0.0, test_fraction=0.0)
    records = load(tmp_path / "out")
    assert set(records) == {"CXR1", "CXR4"}  # CXR2 is empty, CXR3's image is missing
    assert summary.filtered == {"empty_report": 1}
    assert summary.missing_images == [str(images / "CXR3_1_IM-1384-1001.png")]
    assert records["CXR1"]["image"] == "images/CXR1_1_IM-0001-3001.png"
    assert records["CXR1"]["image_ids"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert records["CXR4"]["findings"] is None and records["CXR4"]["impression"] == "No acute disease."
    summary = convert("iu-xray", root, tmp_path / "text", images=images, keep_text_only=True, require_findings=True)
    records = load(tmp_path / "text")
    assert set(records) == {"CXR1", "CXR3"} and records["CXR3"]["image"] is None
    assert summary.filtered == {"empty_report": 1, "empty_findings": 1} and summary.text_only_kept == 1
    with pytest.raises(ConversionError, match="--images"):
        convert("iu-xray", root, tmp_path / "none")


def test_iu_xray_r2gen_layout(tmp_path: Path):
    root = fx.make_r2gen(tmp_path / "iu_xray")
    summary = convert("iu-xray", root, tmp_path / "out")
    records = load(tmp_path / "out")
    assert summary.splits == {"train": 2, "val": 1, "test": 1}
    assert records["CXR100_IM-0000"]["image"] == "images/CXR100_IM-0000_0.png"
    assert records["CXR103_IM-0003"]["image"] == "images/CXR103_IM-0003_1.png"  # the first is missing
    assert records["CXR100_IM-0000"]["findings"] == "the lungs are clear . case 0 ."
    assert summary.missing_images == []


def test_iu_xray_real_reports_from_the_tgz(shared_data: Path, tmp_path: Path):
    tgz = shared_data / "iu_xray_reports" / "NLMCXR_reports.tgz"
    summary = convert("iu-xray", tgz, tmp_path / "out", keep_text_only=True)
    records = load(tmp_path / "out")
    with_findings = [r for r in records.values() if r["findings"]]
    assert len(with_findings) == 3425  # as the data README says
    assert summary.records == len(records) and summary.text_only_kept == len(records)
    assert summary.records + summary.filtered["empty_report"] == 3955
    assert all(r["image"] is None and (r["findings"] or r["impression"]) for r in records.values())
    split = Counter(r["split"] for r in records.values())
    assert abs(split["test"] / len(records) - 0.2) < 0.03 and abs(split["val"] / len(records) - 0.1) < 0.03
    cxr1 = records["CXR1"]
    assert cxr1["findings"].startswith("The cardiac silhouette and mediastinum size are within normal limits.")
    assert cxr1["findings"].endswith("There is no evidence of pneumothorax.")
    assert cxr1["impression"] == "Normal chest x-XXXX."
    assert cxr1["image_ids"] == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    only_findings = convert("iu-xray", tgz, tmp_path / "f", keep_text_only=True, require_findings=True)
    assert only_findings.records == 3425


def test_openi_xml_parser_reads_sections_and_images():
    xml = fx.IU_XML.format(n=7, findings="No effusion.", impression="Normal.", mesh="normal",
                           images='<parentImage id="CXR7_1"/><parentImage id="CXR7_2"/>')
    report = parse_openi_xml(xml)
    assert report["id"] == "CXR7" and report["findings"] == "No effusion." and report["impression"] == "Normal."
    assert report["indication"] == "Cough" and report["image_ids"] == ["CXR7_1", "CXR7_2"]


# -------------------------------------------------------------------------------------- CheXpert


def test_chexpert_captions_policies_and_views(tmp_path: Path):
    info = fx.make_chexpert(tmp_path)
    summary = convert("chexpert", info["root"], tmp_path / "keep")
    records = load(tmp_path / "keep")
    assert summary.filtered == {"non_frontal": 1}
    assert len(summary.missing_images) == 1 and summary.missing_images[0].endswith(info["missing"][0])
    assert summary.splits == {"train": info["train_rows"] - 2, "val": 2}
    uncertain = records[info["rejects"]["uncertain_other"].split("/", 1)[1].removesuffix(".jpg")]
    assert uncertain["labels"]["cardiomegaly"] == -1 and uncertain["labels"]["edema"] == 1
    assert "edema" in uncertain["text"].lower() and "cardiomegaly" in uncertain["text"].lower()
    normal = records[info["rejects"]["no_finding"].split("/", 1)[1].removesuffix(".jpg")]
    assert normal["labels"] == {"no_finding": 1} and "cardiomegaly" not in normal["text"]
    assert all(r["task"] == "caption" and r["text"] for r in records.values())
    convert("chexpert", info["root"], tmp_path / "ones", uncertain="ones")
    assert load(tmp_path / "ones")[uncertain["id"]]["labels"]["cardiomegaly"] == 1
    convert("chexpert", info["root"], tmp_path / "ignore", uncertain="ignore")
    assert "cardiomegaly" not in load(tmp_path / "ignore")[uncertain["id"]]["labels"]


def test_chexpert_five_by_n(tmp_path: Path):
    info = fx.make_chexpert(tmp_path)
    summary = convert("chexpert", info["root"], tmp_path / "a", five_by_200=True, per_class=2, seed=7)
    records = load(tmp_path / "a")
    by_class = defaultdict(list)
    for r in records.values():
        by_class[r["class_name"]].append(r)
        assert r["split"] == "test" and sum(r["labels"].values()) == 1 and r["labels"][r["class_name"]] == 1
        assert set(r["labels"]) == set(COMPETITION_FINDINGS)
    assert {k: len(v) for k, v in by_class.items()} == dict.fromkeys(COMPETITION_FINDINGS, 2)
    allowed = {rel.split("/", 1)[1].removesuffix(".jpg") for rels in info["expected_5x200"].values() for rel in rels}
    assert set(records) <= allowed  # never the lateral, two-positive or uncertain rows
    # Cardiomegaly has 3 candidates of which one image is missing: it is replaced, not lost.
    assert len(by_class["cardiomegaly"]) == 2
    again = convert("chexpert", info["root"], tmp_path / "b", five_by_200=True, per_class=2, seed=7)
    assert set(load(tmp_path / "b")) == set(records) and again.records == summary.records == 10
    short = convert("chexpert", info["root"], tmp_path / "c", five_by_200=True, per_class=3)
    assert short.records == 14 and any("cardiomegaly" in n for n in short.notes)


# ------------------------------------------------------------------------------------ RSNA / SIIM


def test_rsna_dicoms_labels_and_bad_files(tmp_path: Path):
    root = fx.make_rsna(tmp_path / "rsna")
    summary = convert("rsna", root, tmp_path / "out", image_size=32, val_fraction=0.0, test_fraction=0.0)
    records = load(tmp_path / "out")
    assert set(records) == {"p1", "p2"}
    assert records["p1"]["labels"] == {"pneumonia": 1} and len(records["p1"]["boxes"]) == 2
    assert records["p2"]["labels"] == {"pneumonia": 0} and records["p2"]["boxes"] == []
    assert records["p1"]["rsna_class"] == "Lung Opacity" and "pneumonia" in records["p2"]["text"].lower()
    assert summary.missing_images == [str(root / "stage_2_train_images" / "p3.dcm")]
    assert [p for p, _ in summary.unreadable_images] == [str(root / "stage_2_train_images" / "p4.dcm")]
    assert "DICOM" in summary.unreadable_images[0][1]
    # The 16-bit ramp survives: 48x64 -> 32x43, dark on the left, bright on the right.
    with Image.open(tmp_path / "out" / records["p1"]["image"]) as img:
        pixels = np.asarray(img)
    assert pixels.shape == (32, 43) and pixels[:, :4].mean() < 40 and pixels[:, -4:].mean() > 215


def test_siim_finds_dicoms_recursively(tmp_path: Path):
    root = fx.make_siim(tmp_path / "siim")
    summary = convert("siim", root, tmp_path / "out", square=True, image_size=24)
    records = load(tmp_path / "out")
    assert set(records) == set(fx.SIIM_IDS[:2])
    assert records[fx.SIIM_IDS[0]]["labels"] == {"pneumothorax": 0}
    assert records[fx.SIIM_IDS[1]]["labels"] == {"pneumothorax": 1} and records[fx.SIIM_IDS[1]]["masks"] == 2
    assert len(summary.missing_images) == 1 and fx.SIIM_IDS[2] in summary.missing_images[0]
    assert png_size(tmp_path / "out", records[fx.SIIM_IDS[0]]) == (24, 24)


# ---------------------------------------------------------------------------------------- COVIDx


def test_covidx_classes_duplicates_and_tiny_images(tmp_path: Path):
    root = fx.make_covidx(tmp_path / "covidx")
    summary = convert("covidx", root, tmp_path / "out")
    records = load(tmp_path / "out")
    assert set(records) == {"a", "b", "c", "d"}
    assert records["a"]["labels"] == {"covid19": 1} and records["b"]["labels"] == {"covid19": 0}
    assert records["c"]["labels"] == {"covid19": 1, "pneumonia": 0}
    assert records["d"]["labels"]["no_finding"] == 1 and records["d"]["split"] == "test"
    assert "covid-19" in records["a"]["text"].lower()
    assert summary.filtered == {"duplicate_id": 1, "unknown_class": 1, "bad_line": 1, "tiny_image": 1}
    # Without resizing a readable file is copied as is; with it, an RGB file with equal channels becomes grey.
    assert records["b"]["image"] == "images/b.jpg"
    assert (tmp_path / "out/images/b.jpg").read_bytes() == (root / "train/b.jpg").read_bytes()
    convert("covidx", root, tmp_path / "small", image_size=32)
    with Image.open(tmp_path / "small" / load(tmp_path / "small")["b"]["image"]) as img:
        assert img.mode == "L" and img.size == (38, 32) and img.format == "PNG"


# -------------------------------------------------------------------------------------- VQA-RAD


def test_vqa_rad_miniature_with_a_missing_image(tmp_path: Path):
    root = fx.make_vqa_rad(tmp_path / "vqa")
    summary = convert("vqa-rad", root, tmp_path / "out")
    records = load(tmp_path / "out")
    assert set(records) == {"vqa-rad-train-1", "vqa-rad-train-2", "vqa-rad-train-3", "vqa-rad-test-1"}
    assert summary.missing_images == [str(root / "images" / "synpic_missing.jpg")]
    assert records["vqa-rad-train-3"]["answer"] == "2" and records["vqa-rad-train-3"]["answer_type"] == "CLOSED"
    assert records["vqa-rad-train-1"]["modality"] == "cxr" and records["vqa-rad-train-1"]["organ"] == "chest"
    # the test question says MRI, but a held-out answer never reaches the input: the head image's training
    # question (a count) does not say, so the modality comes from the organ
    assert records["vqa-rad-test-1"]["modality"] == "radiology" and records["vqa-rad-test-1"]["split"] == "test"
    assert records["vqa-rad-train-1"]["image"] == records["vqa-rad-train-2"]["image"]  # one PNG per image


def test_vqa_rad_held_out_modality_comes_from_the_organ_not_its_answers(tmp_path: Path):
    """A validation image whose own questions say "MRI" gets the organ's modality; a training image keeps the
    modality its training questions say."""
    items = []
    for n in range(40):  # 40 head images, each asked whether it is an MRI (yes)
        items.append({"qid": n + 1, "image_name": f"synpic{n}.jpg", "image_organ": "HEAD", "answer": "yes",
                      "answer_type": "CLOSED", "question_type": "MODALITY", "question": "Is this an MRI?",
                      "phrase_type": "freeform"})
    root = tmp_path / "vqa"
    (root / "images").mkdir(parents=True)
    (root / "trainset.json").write_text(json.dumps(items), encoding="utf-8")
    for n in range(40):
        fx.write_image(root / "images" / f"synpic{n}.jpg", 40, 40, seed=n)
    convert("vqa-rad", root, tmp_path / "out", val_fraction=0.25, seed=0)
    records = list(load(tmp_path / "out").values())
    by_split = {split: {r["modality"] for r in records if r["split"] == split} for split in ("train", "val")}
    assert by_split == {"train": {"mri"}, "val": {"radiology"}}


def test_vqa_rad_real(shared_data: Path, tmp_path: Path):
    root = shared_data / "vqa_rad"
    source = json.loads((root / "trainset.json").read_text())
    summary = convert("vqa-rad", root, tmp_path / "out", image_size=32, val_fraction=0.15, seed=1)
    records = load(tmp_path / "out")
    assert summary.records == len(source) == 3064
    assert summary.missing_images == [] and summary.unreadable_images == []
    # Split by image: no image in both train and val.
    images = defaultdict(set)
    for r in records.values():
        images[r["split"]].add(r["image"])
        assert r["task"] == "vqa" and r["answer_type"] in ("OPEN", "CLOSED")
    assert not images["train"] & images["val"]
    assert len(images["train"]) + len(images["val"]) == len({s["image_name"] for s in source}) == 314
    assert abs(len(images["val"]) - 0.15 * 314) <= 1
    first = source[0]
    record = records[f"vqa-rad-train-{first['qid']}"]
    assert record["question"] == first["question"] and record["answer"] == str(first["answer"])
    assert record["organ"] == "head" and record["image"] == "images/synpic54610.png"
    assert min(png_size(tmp_path / "out", record)) == 32
    assert Counter(r["organ"] for r in records.values()) == {"chest": 1088, "abdomen": 999, "head": 977}
    head_modalities = Counter(r["modality"] for r in records.values() if r["organ"] == "head")
    assert set(head_modalities) == {"ct", "mri", "radiology"} and head_modalities["mri"] > head_modalities["ct"]


# ---------------------------------------------------------------------------------------- SLAKE


def test_slake_english_by_default(tmp_path: Path):
    root = fx.make_slake(tmp_path / "slake")
    summary = convert("slake", root, tmp_path / "out")
    records = load(tmp_path / "out")
    assert set(records) == {"slake-train-0", "slake-train-2", "slake-val-3", "slake-test-4"}
    assert summary.filtered == {"other_language": 2}
    assert records["slake-train-0"]["modality"] == "cxr" and records["slake-train-2"]["modality"] == "ct"
    assert records["slake-val-3"]["modality"] == "mri" and records["slake-val-3"]["split"] == "val"
    assert records["slake-train-2"]["image"] == records["slake-test-4"]["image"] == "images/xmlab1_source.jpg"
    assert convert("slake", root, tmp_path / "all", lang="all").records == 6


# -------------------------------------------------------------------------------------- MedMNIST


def test_medmnist_real_pneumoniamnist(shared_data: Path, tmp_path: Path):
    npz = shared_data / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
    summary = convert("medmnist", npz, tmp_path / "out")
    records = load(tmp_path / "out")
    assert summary.splits == {"train": 3882, "val": 524}
    with np.load(npz) as data:
        labels = {s: data[f"{s}_labels"][:, 0] for s in ("train", "val")}
        first = data["train_images"][0]
    for split in ("train", "val"):
        ours = [r for r in records.values() if r["split"] == split]
        assert [r["class_index"] for r in ours] == labels[split].tolist()
    assert Counter(r["class_name"] for r in records.values()) == {"pneumonia": 3494 + 389, "no_finding": 388 + 135}
    record = records["pneumoniamnist-train-00000"]
    assert record["labels"]["pneumonia"] == labels["train"][0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / record["image"])), first)
    phrasings = defaultdict(set)
    for r in records.values():
        phrasings[r["class_name"]].add(r["text"])
    assert all(len(p) >= 3 for p in phrasings.values())
    assert all("pneumonia" not in t.lower() or "no pneumonia" in t.lower() for t in phrasings["no_finding"])


def test_medmnist_multilabel_colour_and_names(tmp_path: Path):
    chest = fx.make_medmnist(tmp_path / "chestmnist.npz", 14, multi_label=True)
    summary = convert("medmnist", chest, tmp_path / "chest", image_size=56)
    records = load(tmp_path / "chest")
    assert summary.splits == {"train": 12, "val": 4, "test": 4}
    with np.load(chest) as data:
        row = data["train_labels"][3]
    record = records["chestmnist-train-00003"]
    assert [record["labels"][k] for k in record["labels"]] == row.tolist() and len(record["labels"]) == 14
    assert png_size(tmp_path / "chest", record) == (56, 56)
    derma = fx.make_medmnist(tmp_path / "dermamnist_64.npz", 7, rgb=True, size=64)
    convert("medmnist", derma, tmp_path / "derma", seed=2)
    record = load(tmp_path / "derma")["dermamnist-train-00004"]
    assert record["labels"]["melanoma"] == 1 and "melanoma" in record["text"] and record["modality"] == "dermoscopy"
    with Image.open(tmp_path / "derma" / record["image"]) as img:
        assert img.mode == "RGB" and img.size == (64, 64)
    unnamed = shutil.copy(chest, tmp_path / "mystery.npz")
    with pytest.raises(ConversionError, match="--flag"):
        convert("medmnist", unnamed, tmp_path / "x")
    assert convert("medmnist", unnamed, tmp_path / "y", flag="chestmnist").records == 20
    with pytest.raises(ConversionError, match="do not match"):
        convert("medmnist", unnamed, tmp_path / "z", flag="pneumoniamnist")


def test_medmnist_is_deterministic(tmp_path: Path):
    npz = fx.make_medmnist(tmp_path / "bloodmnist.npz", 8, rgb=True)
    convert("medmnist", npz, tmp_path / "a", seed=5)
    convert("medmnist", npz, tmp_path / "b", seed=5)
    convert("medmnist", npz, tmp_path / "c", seed=6)
    a, b, c = ((tmp_path / d / "manifest.jsonl").read_text() for d in "abc")
    assert a == b and a != c


# ------------------------------------------------------------------------------------------- CLI


def test_cli_data_convert(tmp_path: Path):
    npz = fx.make_medmnist(tmp_path / "breastmnist.npz", 2)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "convert", "medmnist", "--root", str(npz), "--out", str(tmp_path / "o"),
                                 "--image-size", "32", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "20 records" in result.output and "train=12" in result.output
    assert len(load(tmp_path / "o")) == 20
    result = runner.invoke(app, ["data", "convert", "medmnist", "--root", str(npz), "--out", str(tmp_path / "p"),
                                 "--five-by-200"])
    assert result.exit_code == 2 and "five_by_200" in result.output
    result = runner.invoke(app, ["data", "convert", "nope", "--root", str(npz), "--out", str(tmp_path / "q")])
    assert result.exit_code == 2 and "unknown format" in result.output
    rsna = fx.make_rsna(tmp_path / "rsna")
    result = runner.invoke(app, ["data", "convert", "rsna", "--root", str(rsna), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0 and "missing" in result.output and "p3.dcm" in result.output


def test_cli_data_convert_qc(tmp_path: Path):
    npz = fx.make_medmnist(tmp_path / "breastmnist.npz", 2)
    result = CliRunner().invoke(app, ["data", "convert", "medmnist", "--root", str(npz), "--out", str(tmp_path / "o"),
                                      "--qc"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "o"
    raw = out / "manifest.raw.jsonl"
    assert raw.exists() and (out / "qc_report.json").exists() and (out / "qc_report.html").exists()
    report = json.loads((out / "qc_report.json").read_text())
    assert report["input"] == str(raw) and report["records"] == 20
    assert len(load(tmp_path / "o")) == report["kept"] and "qc: 20 records" in result.output
