"""VQA-RAD -> manifest: one "vqa" record per question-answer pair.

Layout under ROOT (the MEVF release): `trainset.json` (and `testset.json` when present), lists of
{qid, image_name, image_organ, answer, answer_type, question_type, question, phrase_type}, and the
images in `images/` (or the original `VQA_RAD Image Folder/`). Splits: the train set is "train"
(optionally split BY IMAGE into train/val with `val_fraction`), the test set is "test".

VQA-RAD records the organ, not the modality. The dataset paper describes its images as head CT or
MRI, chest X-rays and abdominal CT, so the modality is read from the image's own *training*
questions where they say it ("Is this a CT image?" yes; "What type of imaging is this?" MRI), else
from the organ (chest -> "cxr", abdomen -> "ct"), else "radiology" (a head image whose questions do
not say). An image held out for validation or test gets its modality from the organ alone: read from
its own answers, the modality token would hand the model the answers to its modality questions.
The organ (chest / head / abdomen) is kept in the field `organ`.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from medunifier.data.converters.common import (
    ConversionError,
    ConversionSummary,
    Deduplicator,
    ImageWriter,
    assign_splits,
    finish,
    question_answer,
)
from medunifier.data.manifest import Record

ORGANS = {"CHEST": "chest", "HEAD": "head", "ABD": "abdomen"}
ORGAN_MODALITY = {"chest": "cxr", "abdomen": "ct"}  # VQA-RAD: chest X-rays, abdominal CT, head CT or MRI
_MODALITY_WORDS = {
    "mri": re.compile(r"\bmri?\b|\bt1\b|\bt2\b|flair|diffusion|\bdwi\b|\badc\b"),
    "ct": re.compile(r"\bct\b|\bcat scan\b|computed tomography"),
    "xray": re.compile(r"x-? ?ray|\bcxr\b|radiograph|plain film|\bfilm\b"),
}
_MODALITY_QUESTION = re.compile(r"modality|type of imag|kind of imag|type of scan|kind of scan|"
                                r"type of image|kind of image|how was this image taken|what imaging")
_IS_THIS = re.compile(r"^\s*(is|was) (this|the image|this image|the study)\b")


def _modality_votes(text: str) -> list[str]:
    return [name for name, pattern in _MODALITY_WORDS.items() if pattern.search(text)]


def infer_modality(items: list[dict[str, Any]], organ: str) -> str:
    """Modality of one image from its QA pairs: open answers to "what modality" questions and
    closed "is this a ..." questions answered yes; when they do not say, from the organ."""
    votes: Counter[str] = Counter()
    for item in items:
        question, answer = str(item["question"]).lower(), str(item["answer"]).lower().strip()
        if _MODALITY_QUESTION.search(question) and answer not in ("yes", "no"):
            votes.update(_modality_votes(answer))
        elif _IS_THIS.match(question) and answer == "yes":
            found = _modality_votes(question)
            if len(found) == 1:
                votes.update(found)
    best, count = votes.most_common(1)[0] if votes else ("", 0)
    if not votes or sum(v == count for v in votes.values()) > 1:  # silent, or the questions disagree
        return ORGAN_MODALITY.get(organ, "radiology")
    return "cxr" if best == "xray" and organ == "chest" else best


def convert_vqa_rad(root: Path, out: Path, *, val_fraction: float = 0.0, image_size: int | None = None,
                    square: bool = False, min_size: int = 32, seed: int = 0) -> ConversionSummary:
    """Convert VQA-RAD: every QA pair of trainset.json (and testset.json) becomes a record."""
    root, out = Path(root), Path(out)
    summary = ConversionSummary("vqa-rad", str(out))
    sets = [(name, split) for name, split in (("trainset.json", "train"), ("testset.json", "test"))
            if (root / name).is_file()]
    if not sets:
        raise ConversionError(f"{root}: trainset.json not found (is this the VQA-RAD folder?)")
    image_dir = next((d for d in (root / "images", root / "VQA_RAD Image Folder") if d.is_dir()), root / "images")
    items_by_set = {name: json.loads((root / name).read_text(encoding="utf-8")) for name, _ in sets}

    # the split of every image, by image: train set images may go to val; the test set stays test
    image_splits: dict[str, dict[str, str]] = {}
    for name, split in sets:
        names = [i["image_name"] for i in items_by_set[name]]
        image_splits[name] = (assign_splits(names, val_fraction, 0.0, seed) if split == "train" and val_fraction > 0
                              else dict.fromkeys(names, split))
    organ_of: dict[str, str] = {}
    training: dict[str, list[dict[str, Any]]] = defaultdict(list)  # an image's training QA pairs
    for name, _ in sets:
        for item in items_by_set[name]:
            organ_of.setdefault(item["image_name"], ORGANS.get(str(item.get("image_organ", "")).strip(), ""))
            if image_splits[name][item["image_name"]] == "train":
                training[item["image_name"]].append(item)
    modality = {image: infer_modality(training.get(image, []), organ) for image, organ in organ_of.items()}
    summary.notes.append("modality (from the training questions, else the organ): " + ", ".join(
        f"{k}={v}" for k, v in sorted(Counter(modality.values()).items())) + " (images)")

    writer = ImageWriter(out, summary, image_size, square, min_size)
    dedup = Deduplicator(summary)
    records = []
    for name, split in sets:
        items = items_by_set[name]
        image_split = image_splits[name]
        for item in items:
            qa = question_answer(item, summary)
            record_id = f"vqa-rad-{split}-{item['qid']}"
            if qa is None or not dedup.first(record_id):
                continue
            question, answer = qa
            image_name = item["image_name"]
            image = writer.write(image_dir / image_name, Path(image_name).stem)
            if image is None:
                continue
            organ_code = str(item.get("image_organ", "")).strip()
            records.append(Record(
                id=record_id, image=image, text=f"Question: {question} Answer: {answer}",
                split=image_split[image_name], modality=modality[image_name], task="vqa",
                question=question, answer=answer, source="vqa-rad",
                organ=ORGANS.get(organ_code, organ_code.lower() or None),
                answer_type=str(item.get("answer_type", "")).strip().upper() or None,
                question_type=str(item.get("question_type", "")).strip() or None,
                phrase_type=item.get("phrase_type"), qid=item["qid"],
            ))
    return finish(records, out, summary)
