"""COVIDx CXR -> manifest: COVID-19 / pneumonia / normal labels and captions.

Official layout under ROOT: `train.txt`, `test.txt` (and `val.txt` in CXR-3/CXR-4) with lines
`patient_id filename class source`, images under `train/`, `test/`, `val/`. Classes are
positive / negative (COVIDx CXR-2 and later) or COVID-19 / pneumonia / normal (COVIDx v1-v8).
"""

from __future__ import annotations

from pathlib import Path

from medunifier.data.converters.common import (
    ConversionSummary,
    Deduplicator,
    ImageWriter,
    caption_record,
    finish,
    split_tables,
)

CLASS_LABELS = {
    "positive": {"covid19": 1},
    "negative": {"covid19": 0},
    "covid-19": {"covid19": 1, "pneumonia": 0},
    "covid19": {"covid19": 1, "pneumonia": 0},
    "pneumonia": {"covid19": 0, "pneumonia": 1},
    "normal": {"covid19": 0, "pneumonia": 0, "no_finding": 1},
}
SPLIT_FILES = (("train.txt", "train"), ("val.txt", "val"), ("test.txt", "test"))


def convert_covidx(root: Path, out: Path, *, image_size: int | None = None, square: bool = False,
                   min_size: int = 32, seed: int = 0) -> ConversionSummary:
    """Convert COVIDx: official splits; duplicate file names (COVIDx has a few) are dropped."""
    root, out = Path(root), Path(out)
    summary = ConversionSummary("covidx", str(out))
    tables = split_tables(root, SPLIT_FILES, "no train.txt / test.txt found (is this the COVIDx folder?)")
    writer = ImageWriter(out, summary, image_size, square, min_size)
    dedup = Deduplicator(summary)
    records = []
    unknown: set[str] = set()
    for table, split in tables:
        for line in table.read_text(encoding="utf-8").splitlines():
            fields = line.split()
            if len(fields) < 4:
                if fields:
                    summary.filtered["bad_line"] += 1
                continue
            # The filename may contain spaces: it is everything between the patient id and the class.
            patient_id, filename, class_name, data_source = fields[0], " ".join(fields[1:-2]), fields[-2], fields[-1]
            labels = CLASS_LABELS.get(class_name.lower())
            if labels is None:
                unknown.add(class_name)
                summary.filtered["unknown_class"] += 1
                continue
            record_id = Path(filename).stem
            if not dedup.first(record_id):
                continue
            image = writer.write(root / table.stem / filename, record_id)
            if image is None:
                continue
            records.append(caption_record(record_id, image, dict(labels), split, "covidx", seed,
                                          patient_id=patient_id, class_name=class_name, data_source=data_source))
    if unknown:
        summary.notes.append(f"unknown classes skipped: {sorted(unknown)}")
    return finish(records, out, summary)
