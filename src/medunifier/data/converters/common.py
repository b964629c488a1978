"""Shared pieces of the dataset converters: the summary, image writing, splits, labels, report text.

Every converter reads one public dataset in its official layout and writes `OUT/manifest.jsonl`,
`OUT/images/` (PNG; or the original PNG/JPEG files when no resizing is asked) and
`OUT/conversion.json` (the summary). Quality control (design.md section 3)
is applied on the way and every dropped sample is counted under a reason, so nothing disappears
silently: missing and unreadable images are listed with their paths.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medunifier.data.converters.captions import caption_from_labels
from medunifier.data.images import ImageLoadError, load_image, save_png
from medunifier.data.manifest import Record, write_manifest

UNCERTAIN_POLICIES = ("keep", "zeros", "ones", "ignore")
FRONTAL_VIEWS = {"PA", "AP"}
COPY_SUFFIXES = {".png", ".jpg", ".jpeg"}

# The 14 CheXpert label columns (also the MIMIC-CXR chexpert.csv columns), in their file order.
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)


class ConversionError(ValueError):
    """The source folder does not have the expected official layout; the message says what is missing."""


@dataclass
class ConversionSummary:
    """What a conversion wrote and what it dropped, and why."""

    format: str
    out: str
    records: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    text_only_kept: int = 0
    text_only_dropped: int = 0
    filtered: Counter[str] = field(default_factory=Counter)  # reason -> records dropped
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter, repr=False, compare=False)  # perf_counter at creation

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format, "out": self.out, "records": self.records, "splits": dict(self.splits),
            "missing_images": list(self.missing_images),
            "unreadable_images": [{"path": p, "reason": r} for p, r in self.unreadable_images],
            "text_only_kept": self.text_only_kept, "text_only_dropped": self.text_only_dropped,
            "filtered": dict(sorted(self.filtered.items())), "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }

    def lines(self, max_paths: int = 10) -> list[str]:
        """Human-readable summary; long path lists are cut to `max_paths` (all are in conversion.json)."""
        splits = ", ".join(f"{k}={v}" for k, v in sorted(self.splits.items())) or "none"
        out = [f"{self.format}: {self.records} records written to {self.out}/manifest.jsonl ({splits}) "
               f"in {self.seconds:.1f} s"]
        if self.text_only_kept or self.text_only_dropped:
            out.append(f"text-only records: {self.text_only_kept} kept, {self.text_only_dropped} dropped")
        if self.filtered:
            out.append("filtered: " + ", ".join(f"{k}={v}" for k, v in sorted(self.filtered.items())))
        if self.missing_images:
            out.append(f"images missing: {len(self.missing_images)}")
            out += [f"  missing {p}" for p in self.missing_images[:max_paths]]
        if self.unreadable_images:
            out.append(f"unreadable images skipped: {len(self.unreadable_images)}")
            out += [f"  unreadable {p}: {r}" for p, r in self.unreadable_images[:max_paths]]
        hidden = max(0, len(self.missing_images) - max_paths) + max(0, len(self.unreadable_images) - max_paths)
        if hidden:
            out.append(f"  ... {hidden} more paths in {self.out}/conversion.json")
        out += [f"note: {n}" for n in self.notes]
        return out


class ImageWriter:
    """Convert source images to PNG under `out/images/`, once per source file.

    `image_size` resizes so the short side equals it (aspect kept), or both sides with `square`,
    and writes PNG (grey when the three channels of a colour image are equal). Without it, a
    PNG/JPEG source is copied as is once it has been read successfully, and a DICOM becomes a PNG.
    Images whose short side is below `min_size` are dropped as tiny. Missing, unreadable and tiny
    images are recorded in the summary and give None.
    """

    def __init__(self, out: Path, summary: ConversionSummary, image_size: int | None = None,
                 square: bool = False, min_size: int = 32):
        if image_size is not None and image_size < 1:
            raise ConversionError(f"image size must be positive, got {image_size}")
        self.images_dir = Path(out) / "images"
        self.summary = summary
        self.image_size = image_size
        self.square = square
        self.min_size = min_size
        self._done: dict[str, str | None] = {}

    def write(self, source: Path, name: str) -> str | None:
        """Convert `source` to `images/<name>.png`; returns the manifest-relative path or None."""
        key = str(source)
        if key not in self._done:
            self._done[key] = self._convert(Path(source), name)
        return self._done[key]

    def _convert(self, source: Path, name: str) -> str | None:
        if not source.is_file():
            self.summary.missing_images.append(str(source))
            return None
        try:
            arr = load_image(source)
        except ImageLoadError as err:
            self.summary.unreadable_images.append((str(source), err.reason))
            return None
        if self.image_size is None and source.suffix.lower() in COPY_SUFFIXES:
            # No resizing asked: a readable PNG/JPEG is copied as is (re-encoding a large PNG is slow).
            if min(arr.shape[:2]) < self.min_size:
                self.summary.filtered["tiny_image"] += 1
                return None
            relative = f"images/{safe_name(name)}{source.suffix.lower()}"
            self.images_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, self.images_dir.parent / relative)
            return relative
        return self.write_array(arr, name)

    def write_array(self, arr: np.ndarray, name: str) -> str | None:
        """Write a float [0, 1] or uint8 array (H, W) / (H, W, 3); None when it is tiny."""
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        height, width = arr.shape[:2]
        if min(height, width) < self.min_size:
            self.summary.filtered["tiny_image"] += 1
            return None
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        if self.image_size is not None:
            arr = resize_uint8(arr, self.image_size, self.square)
        relative = f"images/{safe_name(name)}.png"
        save_png(arr, self.images_dir.parent / relative)
        return relative


def resize_uint8(arr: np.ndarray, size: int, square: bool = False) -> np.ndarray:
    """Resize a uint8 image so its short side is `size` (aspect kept) or to size x size."""
    height, width = arr.shape[:2]
    if square:
        new_w, new_h = size, size
    elif height <= width:
        new_h, new_w = size, max(1, round(width * size / height))
    else:
        new_w, new_h = size, max(1, round(height * size / width))
    if (new_h, new_w) == (height, width):
        return arr
    img = Image.fromarray(arr).resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(img)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file name from an id: anything but letters, digits, '.', '_' and '-' becomes '_'."""
    return _UNSAFE.sub("_", name).strip("._") or "image"


class Deduplicator:
    """Drops records whose id was already seen, counting them as `duplicate_id`."""

    def __init__(self, summary: ConversionSummary):
        self.summary = summary
        self.seen: set[str] = set()

    def first(self, record_id: str) -> bool:
        if record_id in self.seen:
            self.summary.filtered["duplicate_id"] += 1
            return False
        self.seen.add(record_id)
        return True


def finish(records: list[Record], out: Path, summary: ConversionSummary) -> ConversionSummary:
    """Write the manifest and `conversion.json`; fill in the counts and the seconds since the summary was made."""
    summary.seconds = time.perf_counter() - summary.started
    out = Path(out)
    summary.records = write_manifest(records, out / "manifest.jsonl")
    summary.splits = dict(sorted(Counter(r.split for r in records).items()))
    (out / "conversion.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    return summary


def assign_splits(keys: Iterable[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Seeded split of unique keys (patients, images, reports): the same keys and seed give the same split."""
    if not (0.0 <= val_fraction < 1 and 0.0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConversionError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    unique = sorted(set(keys))
    random.Random(seed).shuffle(unique)
    n_test = round(len(unique) * test_fraction)
    n_val = round(len(unique) * val_fraction)
    splits = {}
    for i, key in enumerate(unique):
        splits[key] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return splits


def snake(name: str) -> str:
    """'Pleural Effusion' -> 'pleural_effusion' (the names of `medunifier.data.findings`)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def parse_label(value: str | None) -> int | None:
    """A CheXpert-style cell: '1.0' -> 1, '0.0' -> 0, '-1.0' -> -1, blank -> None."""
    if value is None or not value.strip():
        return None
    number = int(float(value))
    if number not in (-1, 0, 1):
        raise ValueError(f"label value {value!r} is not 1, 0, -1 or blank")
    return number


def apply_uncertain(value: int | None, policy: str) -> int | None:
    """CheXpert uncertainty policy for -1: keep it, map to 0 or 1, or drop the label (None)."""
    if value != -1:
        return value
    check_uncertain(policy)
    return {"keep": -1, "zeros": 0, "ones": 1, "ignore": None}[policy]


def check_uncertain(policy: str) -> None:
    if policy not in UNCERTAIN_POLICIES:
        raise ConversionError(f"uncertain policy must be one of {', '.join(UNCERTAIN_POLICIES)}, got {policy!r}")


def chexpert_labels(row: Mapping[str, str], policy: str) -> dict[str, int]:
    """The 14 CheXpert columns of a CSV row to our snake_case names; blank cells are left out."""
    labels = {}
    for column in CHEXPERT_LABELS:
        value = apply_uncertain(parse_label(row.get(column)), policy)
        if value is not None:
            labels[snake(column)] = value
    return labels


def iter_csv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV, streamed (gzip when the name ends in .gz); names and cells are stripped of spaces."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        for row in reader:
            if row:
                yield dict(zip(header, (c.strip() for c in row)))


def find_file(root: Path, names: Iterable[str]) -> Path | None:
    """The first of `names` that exists under root (plain or .gz)."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def require_file(root: Path, names: Iterable[str], missing: str) -> Path:
    """The first of `names` under root (plain or .gz), or a ConversionError saying `missing`.

    Args:
        root: the dataset folder.
        names: the file names to try, in order.
        missing: what the error says after the folder, e.g. "train-rle.csv not found (is this the SIIM-ACR folder?)".
    """
    found = find_file(root, names)
    if found is None:
        raise ConversionError(f"{root}: {missing}")
    return found


def split_tables(root: Path, split_files: Iterable[tuple[str, str]], missing: str) -> list[tuple[Path, str]]:
    """The (file, split) pairs of a dataset's official split tables that exist under root.

    Args:
        root: the dataset folder.
        split_files: (file name, split) pairs, e.g. (("train.txt", "train"), ("test.txt", "test")).
        missing: what the ConversionError says after the folder when none exists.
    """
    tables = [(root / name, split) for name, split in split_files if (root / name).is_file()]
    if not tables:
        raise ConversionError(f"{root}: {missing}")
    return tables


def question_answer(item: Mapping[str, Any], summary: ConversionSummary) -> tuple[str, str] | None:
    """The stripped question and answer of a VQA item; None, counted as filtered "empty_qa", when either is empty.

    Args:
        item: one question of the dataset's JSON, with "question" and "answer".
        summary: the conversion's summary.
    """
    question, answer = str(item.get("question", "")).strip(), str(item.get("answer", "")).strip()
    if not question or not answer:
        summary.filtered["empty_qa"] += 1
        return None
    return question, answer


def compose_text(findings: str | None, impression: str | None) -> str:
    """The manifest `text` of a report: 'FINDINGS: ... IMPRESSION: ...' with the parts present."""
    parts = []
    if findings:
        parts.append(f"FINDINGS: {findings}")
    if impression:
        parts.append(f"IMPRESSION: {impression}")
    return " ".join(parts)


def clean_text(text: str | None) -> str | None:
    """Collapse whitespace; empty becomes None."""
    if text is None:
        return None
    text = " ".join(text.split())
    return text or None


def report_labeler() -> Callable[[str], dict[str, int]] | None:
    """The rule-based report labeler (`medunifier.data.labeler.label_report`) if it is installed."""
    try:
        from medunifier.data.labeler import label_report
    except ImportError:
        return None

    def label(text: str) -> dict[str, int]:
        result = label_report(text)
        result = getattr(result, "labels", result)
        return {str(k): int(v) for k, v in dict(result).items() if int(v) in (-1, 0, 1)}

    return label


def record_rng(seed: int, record_id: str) -> random.Random:
    """A generator for one record's random choices (captions): independent of the other records."""
    return random.Random(f"{seed}:{record_id}")


def caption_record(record_id: str, image: str, labels: dict[str, int], split: str, source: str, seed: int,
                   **fields: Any) -> Record:
    """A chest X-ray caption record of a label-only dataset: its labels and a seeded caption drawn from them.

    Args:
        record_id: the record's id (also seeds its caption, with `seed`).
        image: the manifest-relative image path.
        labels: finding -> 1 (present), 0 (absent) or -1 (uncertain).
        split: train, val or test.
        source: the dataset's name.
        seed: the conversion seed.
        **fields: the dataset's own extra fields.
    """
    return Record(id=record_id, image=image, text=caption_from_labels(labels, record_rng(seed, record_id)),
                  labels=labels, split=split, modality="cxr", task="caption", source=source, **fields)


def iter_with_seed(items: list[Any], seed: int) -> Iterator[Any]:
    """The items in a seeded random order (for sampling until enough usable ones are found)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    yield from order
