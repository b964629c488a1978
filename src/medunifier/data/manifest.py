"""The one manifest format every source is converted to (design.md section 3).

JSON Lines, one record per sample; `image` is relative to the manifest's folder. Reading
validates every line and names the line number and field of a bad record; by default bad lines
are reported and skipped so that no other record is lost.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Split = Literal["train", "val", "test"]
Task = Literal["report", "vqa", "caption", "cls", "edit"]


class Record(BaseModel):
    """One sample. `labels` maps a finding to 1 (present), 0 (absent) or -1 (uncertain)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    image: str | None = None
    text: str = ""
    findings: str | None = None
    impression: str | None = None
    labels: dict[str, int] = Field(default_factory=dict)
    split: Split = "train"
    modality: str = "cxr"
    task: Task = "report"
    question: str | None = None
    answer: str | None = None
    source: str = "unknown"
    # counterfactual edit records (task "edit"): `image` is the source, `text` the target's report
    target_image: str | None = None  # the ground-truth edited image, relative like `image`
    instruction: str | None = None  # a natural edit instruction ("add a moderate left pleural effusion")
    pair_id: str | None = None  # shared by an edit record and the two single-image records of its pair

    @field_validator("labels")
    @classmethod
    def _label_values(cls, labels: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in labels.items() if v not in (-1, 0, 1)}
        if bad:
            raise ValueError(f"label values must be -1, 0 or 1, got {bad}")
        return labels

    def image_path(self, root: str | Path) -> Path | None:
        return None if self.image is None else Path(root) / self.image

    def target_image_path(self, root: str | Path) -> Path | None:
        return None if self.target_image is None else Path(root) / self.target_image

    def training_image(self) -> str | None:
        """The image this record trains on: an edit record's target (it goes with the target report), else `image`."""
        if self.task == "edit" and self.target_image is not None:
            return self.target_image
        return self.image


class ManifestError(ValueError):
    """A manifest line that is not a valid record; names the file, line and field."""


@dataclass
class ReadReport:
    """What reading a manifest skipped, so a caller can print it."""

    path: Path
    errors: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.errors)


def parse_line(line: str, lineno: int, path: str | Path) -> Record:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}:{lineno}: a record must be a JSON object")
    try:
        return Record.model_validate(data)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(record)"
            parts.append(f"field '{key}': {e['msg']}")
        raise ManifestError(f"{path}:{lineno}: " + "; ".join(parts)) from None


def iter_manifest(path: str | Path, strict: bool = False, report: ReadReport | None = None) -> Iterator[Record]:
    """Yield valid records; a bad line raises when `strict`, else is noted in `report` and skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield parse_line(line, lineno, path)
            except ManifestError as err:
                if strict:
                    raise
                if report is not None:
                    report.errors.append(str(err))


def read_manifest(path: str | Path, strict: bool = False) -> tuple[list[Record], ReadReport]:
    report = ReadReport(Path(path))
    records = list(iter_manifest(path, strict=strict, report=report))
    ids = Counter(r.id for r in records)
    duplicates = [i for i, n in ids.items() if n > 1]
    if duplicates:
        msg = f"{path}: {len(duplicates)} duplicate ids, e.g. {duplicates[:3]}"
        if strict:
            raise ManifestError(msg)
        report.errors.append(msg)
    return records, report


def load_records(path: str | Path, splits: Iterable[str] | None = None) -> list[Record]:
    """Read a manifest, print what was skipped, keep the given splits."""
    records, report = read_manifest(path)
    for err in report.errors:
        print(f"warning: {err}")
    if report.skipped:
        print(f"warning: skipped {report.skipped} bad manifest lines in {path}")
    if splits is not None:
        wanted = set(splits)
        records = [r for r in records if r.split in wanted]
    return records


def write_manifest(records: Iterable[Record | dict[str, Any]], path: str | Path) -> int:
    """Write records as JSON Lines atomically (temp file + rename); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    count = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            if not isinstance(rec, Record):
                rec = Record.model_validate(rec)
            fh.write(json.dumps(rec.model_dump(exclude_none=False), ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


PATH_FIELDS = ("image", "target_image", "edit_region")  # relative to the manifest's folder


def merge_manifests(manifests: Iterable[str | Path], out: str | Path) -> dict[str, int]:
    """Concatenate manifests into one at `out`, rewriting image paths relative to `out`'s folder.

    Record ids must be unique across the inputs (a duplicate is an error naming both manifests); nothing is
    copied, the merged manifest points at the inputs' image folders. Returns the record count per input.
    """
    out = Path(out)
    folder = out.parent.resolve()
    seen: dict[str, Path] = {}
    merged: list[Record] = []
    counts: dict[str, int] = {}
    for manifest in manifests:
        manifest = Path(manifest)
        root = manifest.parent.resolve()
        records = load_records(manifest)
        for record in records:
            if record.id in seen:
                raise ManifestError(f"record id '{record.id}' is in both {seen[record.id]} and {manifest}: "
                                    "ids must be unique across merged manifests")
            seen[record.id] = manifest
            updates = {}
            for name in PATH_FIELDS:
                value = getattr(record, name, None)
                if isinstance(value, str) and value:
                    updates[name] = os.path.relpath(root / value, folder)
            merged.append(record.model_copy(update=updates))
        counts[str(manifest)] = len(records)
    write_manifest(merged, out)
    return counts


def summarize(records: list[Record]) -> dict[str, Any]:
    """Counts by split, source, task, modality and label prevalence (positives / labelled)."""
    summary: dict[str, Any] = {"records": len(records)}
    for key in ("split", "source", "task", "modality"):
        summary[key] = dict(sorted(Counter(getattr(r, key) for r in records).items()))
    positives: Counter[str] = Counter()
    labelled: Counter[str] = Counter()
    for r in records:
        for name, value in r.labels.items():
            if value in (0, 1):
                labelled[name] += 1
                positives[name] += value
    summary["labels"] = {
        name: {"positive": positives[name], "labelled": labelled[name], "prevalence": positives[name] / labelled[name]}
        for name in sorted(labelled)
    }
    summary["with_image"] = sum(r.image is not None for r in records)
    return summary
