"""SLAKE (Slake1.0) -> manifest: one "vqa" record per question-answer pair, English only by default.

Official layout under ROOT: `train.json`, `validate.json`, `test.json` (lists of {img_id, img_name,
question, answer, answer_type, modality, location, q_lang, qid, content_type, ...}) and the images
`imgs/xmlabN/source.jpg` (`img_name` is relative to `imgs/`).
"""

from __future__ import annotations

import json
from pathlib import Path

from medunifier.data.converters.common import (
    ConversionError,
    ConversionSummary,
    Deduplicator,
    ImageWriter,
    finish,
    question_answer,
    split_tables,
)
from medunifier.data.manifest import Record

SPLIT_FILES = (("train.json", "train"), ("validate.json", "val"), ("test.json", "test"))


def _modality(name: str, location: str) -> str:
    name, location = name.strip().lower(), location.strip().lower()
    if name in ("x-ray", "xray", "x ray"):
        return "cxr" if location.startswith(("chest", "lung")) else "xray"
    return {"ct": "ct", "mri": "mri"}.get(name, name or "radiology")


def convert_slake(root: Path, out: Path, *, lang: str = "en", image_size: int | None = None, square: bool = False,
                  min_size: int = 32, seed: int = 0) -> ConversionSummary:
    """Convert SLAKE: official splits; `lang` "en", "zh" or "all" selects the question language."""
    root, out = Path(root), Path(out)
    summary = ConversionSummary("slake", str(out))
    if lang not in ("en", "zh", "all"):
        raise ConversionError(f"lang must be en, zh or all, got {lang!r}")
    tables = split_tables(root, SPLIT_FILES, "no train.json / validate.json / test.json found (is this Slake1.0?)")
    writer = ImageWriter(out, summary, image_size, square, min_size)
    dedup = Deduplicator(summary)
    records = []
    for table, split in tables:
        for item in json.loads(table.read_text(encoding="utf-8")):
            language = str(item.get("q_lang", "en")).strip().lower()
            if lang != "all" and language != lang:
                summary.filtered["other_language"] += 1
                continue
            qa = question_answer(item, summary)
            record_id = f"slake-{split}-{item['qid']}"
            if qa is None or not dedup.first(record_id):
                continue
            question, answer = qa
            image_name = str(item["img_name"])
            image = writer.write(root / "imgs" / image_name, Path(image_name).with_suffix("").as_posix())
            if image is None:
                continue
            location = str(item.get("location", ""))
            records.append(Record(
                id=record_id, image=image, text=f"Question: {question} Answer: {answer}", split=split,
                modality=_modality(str(item.get("modality", "")), location), task="vqa", question=question,
                answer=answer, source="slake", organ=location or None, language=language,
                answer_type=str(item.get("answer_type", "")).strip().upper() or None,
                content_type=item.get("content_type"), qid=item["qid"], img_id=item.get("img_id"),
            ))
    return finish(records, out, summary)
