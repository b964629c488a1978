"""The one manifest format every source is converted to (design.md section 3).

JSON Lines, one record per sample; `image` is relative to the manifest's folder. Reading
validates every line and names the line number and field of a bad record; by default bad lines
are reported and skipped so that no other record is lost.

Containment: every image or mask path (`PATH_FIELDS`) must resolve, symlinks followed, inside the
manifest's folder, or inside an explicit image root (`--image-root`, `set_image_root`) when the images
live elsewhere (a merged manifest points into its inputs' folders). Paths stay relative to the manifest's
folder either way; an absolute path or one that escapes the root is rejected per record.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medunifier.config import I2I_TASKS

Split = Literal["train", "val", "test"]
Task = Literal["report", "vqa", "caption", "cls", "edit", "translate", "upscale", "segment"]
IMAGE_TEXT_TASKS = tuple(t for t in get_args(Task) if t not in I2I_TASKS)  # records whose text goes with the image


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
    # image-to-image records (I2I_TASKS): translate/upscale have a `target_image`, segment a binary `mask`
    # (PNG, non-zero = inside), all an `instruction` ("translate to a bone-suppressed image", "upscale x4")
    mask: str | None = None

    @field_validator("labels")
    @classmethod
    def _label_values(cls, labels: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in labels.items() if v not in (-1, 0, 1)}
        if bad:
            raise ValueError(f"label values must be -1, 0 or 1, got {bad}")
        return labels

    @model_validator(mode="after")
    def _i2i_fields(self) -> Record:
        """An image-to-image record has a source image, an instruction and its target; a mask is a segment's."""
        if self.task in I2I_TASKS:
            if not self.image:
                raise ValueError(f"a '{self.task}' record needs 'image' (the source image)")
            if not (self.instruction or "").strip():
                raise ValueError(f"a '{self.task}' record needs a non-empty 'instruction' (e.g. 'upscale x4')")
            if self.task == "segment" and not self.mask:
                raise ValueError("a 'segment' record needs 'mask' (a PNG of the target region)")
            if self.task != "segment" and not self.target_image:
                raise ValueError(f"a '{self.task}' record needs 'target_image' (the image to produce)")
        if self.mask is not None and self.task != "segment":
            raise ValueError(f"'mask' belongs to 'segment' records, not '{self.task}': set task to segment or drop it")
        return self

    def mask_path(self, root: str | Path, image_root: str | Path | None = None) -> Path | None:
        return None if self.mask is None else contained_path(root, self.mask, image_root)

    def image_path(self, root: str | Path, image_root: str | Path | None = None) -> Path | None:
        """`root / image`, checked to stay inside `image_root` (see `contained_path`)."""
        return None if self.image is None else contained_path(root, self.image, image_root)

    def target_image_path(self, root: str | Path, image_root: str | Path | None = None) -> Path | None:
        return None if self.target_image is None else contained_path(root, self.target_image, image_root)

    def training_image(self) -> str | None:
        """The image this record trains on: an edit record's target (it goes with the target report), else `image`."""
        if self.task == "edit" and self.target_image is not None:
            return self.target_image
        return self.image


PATH_FIELDS = ("image", "target_image", "edit_region", "mask")  # relative to the manifest's folder


class ManifestError(ValueError):
    """A manifest line that is not a valid record; names the file, line and field.

    `reason` is a short key for counting: invalid_json, invalid_record, unsafe_path, duplicate_id.
    """

    def __init__(self, message: str, reason: str = "invalid_record", line: int | None = None):
        super().__init__(message)
        self.reason, self.line = reason, line


class UnsafePathError(ValueError):
    """An image or mask path that is absolute or resolves outside the allowed root."""


# ------------------------------------------------------------------------------------- containment

_image_root: Path | None = None


def set_image_root(path: str | Path | None) -> None:
    """Allow image paths anywhere inside `path` (None: only inside each manifest's own folder)."""
    global _image_root
    if path is not None and not Path(path).is_dir():
        raise FileNotFoundError(f"image root {path} is not a folder")
    _image_root = None if path is None else Path(path).resolve()


def get_image_root() -> Path | None:
    return _image_root


def contained_path(base: str | Path, relative: str, image_root: str | Path | None = None) -> Path:
    """`base / relative` after checking that it resolves (symlinks followed) inside the allowed root.

    The root is `image_root`, else the one set by `set_image_root`, else `base` (the manifest's folder).
    Raises UnsafePathError saying why: an absolute path, a path that escapes, a symlink that leaves.
    """
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute() or \
            PureWindowsPath(relative).drive:
        raise UnsafePathError(f"absolute path '{relative}' refused: image paths must be relative to the "
                              "manifest's folder")
    base = Path(base)
    root = Path(image_root) if image_root is not None else _image_root if _image_root is not None else base
    root = root.resolve()
    joined = base / relative
    if not joined.resolve().is_relative_to(root):
        hint = "move the file inside it or pass --image-root with a folder that holds it"
        if Path(os.path.normpath(base.resolve() / relative)).is_relative_to(root):
            raise UnsafePathError(f"'{relative}' is a symlink that leads outside {root}: {hint}")
        raise UnsafePathError(f"'{relative}' resolves outside {root}: {hint}")
    return joined


def check_paths(record: Record, base: str | Path, image_root: str | Path | None = None) -> None:
    """Raise UnsafePathError when any image or mask path of `record` leaves the allowed root."""
    for name in PATH_FIELDS:
        value = getattr(record, name, None)
        if isinstance(value, str) and value:
            try:
                contained_path(base, value, image_root)
            except UnsafePathError as err:
                raise UnsafePathError(f"field '{name}': {err}") from None


# ------------------------------------------------------------------------------------------ reading


@dataclass
class Problem:
    """One record left out of a manifest: its line, a short reason key and the full message."""

    line: int | None
    reason: str
    message: str
    id: str | None = None


@dataclass
class ReadReport:
    """What reading a manifest skipped, so a caller can print it."""

    path: Path
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [p.message for p in self.problems]

    @property
    def skipped(self) -> int:
        return len(self.problems)

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(p.reason for p in self.problems).most_common())

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": str(self.path), "skipped": self.skipped, "by_reason": self.by_reason(),
                "problems": [vars(p) for p in self.problems]}

    def summary_lines(self, first: int = 5) -> list[str]:
        """'N records left out (reason: n, ...)' and the first few messages."""
        if not self.problems:
            return []
        counts = ", ".join(f"{k}: {v}" for k, v in self.by_reason().items())
        lines = [f"{self.path}: {self.skipped} records left out ({counts})"]
        lines += [f"  {m}" for m in self.errors[:first]]
        if self.skipped > first:
            lines.append(f"  ... and {self.skipped - first} more")
        return lines


def parse_line(line: str, lineno: int, path: str | Path) -> Record:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno})",
                            "invalid_json", lineno) from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}:{lineno}: a record must be a JSON object", "invalid_record", lineno)
    try:
        return Record.model_validate(data)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(record)"
            parts.append(f"field '{key}': {e['msg']}")
        raise ManifestError(f"{path}:{lineno}: " + "; ".join(parts), "invalid_record", lineno) from None


def iter_manifest(path: str | Path, strict: bool = False, report: ReadReport | None = None,
                  image_root: str | Path | None = None) -> Iterator[Record]:
    """Yield valid records; a bad line raises when `strict`, else is noted in `report` and skipped."""
    for _, record in iter_numbered(path, strict, report, image_root):
        yield record


def iter_numbered(path: str | Path, strict: bool = False, report: ReadReport | None = None,
                  image_root: str | Path | None = None) -> Iterator[tuple[int, Record]]:
    """(line number, record) of each valid record; a bad line raises when `strict`, else goes to `report`.

    Args:
        path: the manifest.jsonl.
        strict: raise ManifestError on the first bad line instead of skipping it.
        report: collects the skipped lines.
        image_root: the folder image paths must stay in (default: see `contained_path`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = parse_line(line, lineno, path)
                try:
                    check_paths(record, path.parent, image_root)
                except UnsafePathError as err:
                    raise ManifestError(f"{path}:{lineno}: record '{record.id}': {err}", "unsafe_path",
                                        lineno) from None
            except ManifestError as err:
                if strict:
                    raise
                if report is not None:
                    report.problems.append(Problem(err.line, err.reason, str(err)))
                continue
            yield lineno, record


def read_manifest(path: str | Path, strict: bool = False,
                  image_root: str | Path | None = None) -> tuple[list[Record], ReadReport]:
    """Valid records and a report of the skipped ones; of records sharing an id the first is kept."""
    report = ReadReport(Path(path))
    records: list[Record] = []
    first_line: dict[str, int] = {}
    for line, record in iter_numbered(path, strict=strict, report=report, image_root=image_root):
        if record.id in first_line:
            msg = f"{path}:{line}: duplicate id '{record.id}' (first on line {first_line[record.id]}): left out"
            if strict:
                raise ManifestError(msg, "duplicate_id", line)
            report.problems.append(Problem(line, "duplicate_id", msg, record.id))
            continue
        first_line[record.id] = line
        records.append(record)
    return records, report


def load_records(path: str | Path, splits: Iterable[str] | None = None,
                 image_root: str | Path | None = None) -> list[Record]:
    """Read a manifest, print what was skipped, keep the given splits."""
    records, report = read_manifest(path, image_root=image_root)
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
