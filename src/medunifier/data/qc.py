"""`medunifier data qc`: look at a manifest's data before training on it, and leave out what cannot be trusted.

Checks, each a reason key in the report:

    invalid_json, invalid_record, unsafe_path, duplicate_id   lines `read_manifest` leaves out (the first of
                                                              several records sharing an id is kept)
    unreadable_image      an image (or edit target) that does not decode
    exact_duplicate       the same pixels as an earlier record (a hash of the decoded image)
    near_duplicate        a difference hash (dHash, 16x16 = 256 bits) within `near_bits` of an earlier record
    blank_image           near-constant pixels (standard deviation below `blank_std`)
    saturated_image       more than `saturated_share` of the pixels pure black or pure white
    extreme_aspect        width / height (or the inverse) above `max_aspect`
    empty_report, short_report   a report / caption record whose text is empty or under `min_words` words
    non_frontal_view      a chest X-ray whose recorded `view` is not PA or AP
    label_disagreement    a 0/1 label that the report labeler (data/labeler.py) reads the other way
    deid_placeholder      de-identification placeholders (`___`, `XXXX`) removed from the text: cleaned, kept

Image duplicates are looked for among records that own their image: VQA records (several questions per
image) and edit records (which reuse their pair's images) are left out of that check, and the two images
of a counterfactual pair (one `pair_id`) are near-duplicates by design. The input is never modified: the
cleaned manifest, `qc_report.json` (every finding with line, reason and detail) and `qc_report.html`
(counts per reason, thumbnails of what was dropped) are written beside `out`. `keep=True` flags
(`qc_flags` on the record) instead of dropping.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medunifier.data.converters.common import FRONTAL_VIEWS
from medunifier.data.images import ImageLoadError, load_image
from medunifier.data.labeler import label_report
from medunifier.data.manifest import (
    PATH_FIELDS,
    Record,
    contained_path,
    iter_numbered,
    read_manifest,
    write_manifest,
)

REPORT_JSON = "qc_report.json"
REPORT_HTML = "qc_report.html"
# MIMIC-CXR writes "___" for a removed name or date, IU X-Ray "XXXX"
DEID_PLACEHOLDER = re.compile(r"_{3,}|\bX{4,}\b")
TEXT_FIELDS = ("text", "findings", "impression")


@dataclass
class QCSettings:
    """Thresholds of the checks.

    Args:
        near_bits: dHash bits (of 256) within which two images are near duplicates.
        blank_std: an image whose pixel standard deviation (in [0, 1]) is below this is blank.
        saturated_share: share of pure black or white pixels above which an image is saturated.
        max_aspect: the largest allowed width/height or height/width.
        min_words: the fewest words a report or caption may have.
        check_views: drop chest X-rays whose recorded view is not frontal.
        check_labels: compare 0/1 labels with the report labeler.
        thumbnails: at most this many thumbnails per reason in the HTML report.
    """

    near_bits: int = 10
    blank_std: float = 0.02
    saturated_share: float = 0.5
    max_aspect: float = 3.0
    min_words: int = 3
    check_views: bool = True
    check_labels: bool = True
    thumbnails: int = 48


@dataclass
class Finding:
    """One thing QC found about a record."""

    reason: str
    detail: str
    id: str | None = None
    line: int | None = None
    image: str | None = None
    action: str = "dropped"  # dropped | flagged | cleaned
    thumbnail: str | None = field(default=None, repr=False)  # PNG data URL, HTML report only


@dataclass
class QCResult:
    """What `run_qc` did: counts, every finding and the files it wrote."""

    records: int
    kept: int
    findings: list[Finding]
    manifest: Path
    report_json: Path
    report_html: Path

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(f.reason for f in self.findings).most_common())

    @property
    def dropped(self) -> int:
        return len({(f.id, f.line) for f in self.findings if f.action == "dropped"})


# ------------------------------------------------------------------------------------------- images


def dhash(grey: np.ndarray, side: int = 16) -> np.ndarray:
    """Difference hash: whether each pixel of a (side+1) x side resize is brighter than its left neighbour;
    bool [side * side]."""
    img = Image.fromarray((np.clip(grey, 0, 1) * 255 + 0.5).astype(np.uint8)).resize((side + 1, side),
                                                                                    Image.BILINEAR)
    x = np.asarray(img, dtype=np.int16)
    return (x[:, 1:] > x[:, :-1]).ravel()


def pixel_hash(array: np.ndarray) -> str:
    """Hash of the decoded pixels at 8 bits (same picture in another file format, same hash)."""
    quantised = (np.clip(array, 0, 1) * 255 + 0.5).astype(np.uint8)
    return hashlib.sha256(str(quantised.shape).encode() + quantised.tobytes()).hexdigest()


def thumbnail_url(array: np.ndarray, side: int = 96) -> str:
    img = Image.fromarray((np.clip(array[..., :3] if array.ndim == 3 else array, 0, 1) * 255 + 0.5).astype(np.uint8))
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_problems(grey: np.ndarray, shape: tuple[int, ...], s: QCSettings) -> list[tuple[str, str]]:
    """(reason, detail) of a decoded grey image: blank, saturated, extreme aspect ratio."""
    found = []
    h, w = shape[:2]
    aspect = max(h, w) / max(1, min(h, w))
    if aspect > s.max_aspect:
        found.append(("extreme_aspect", f"{w}x{h} pixels: aspect ratio {aspect:.1f} > {s.max_aspect}"))
    std = float(grey.std())
    if std < s.blank_std:
        found.append(("blank_image", f"pixel standard deviation {std:.4f} < {s.blank_std}"))
    extreme = float(((grey <= 1 / 255) | (grey >= 254 / 255)).mean())
    if extreme > s.saturated_share:
        found.append(("saturated_image", f"{extreme:.0%} of the pixels pure black or white"))
    return found


# --------------------------------------------------------------------------------------------- text


def clean_placeholders(text: str) -> str:
    """`text` without de-identification placeholders, spaces tidied."""
    text = DEID_PLACEHOLDER.sub(" ", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    return re.sub(r"\s+([.,;:])", r"\1", text).strip()


def report_text(record: Record) -> str:
    if record.text.strip():
        return record.text
    return " ".join(p for p in (record.findings, record.impression) if p)


def text_problems(record: Record, s: QCSettings) -> list[tuple[str, str]]:
    """(reason, detail) of a record's report: empty, too short, labels the labeler reads otherwise, a view."""
    found = []
    text = report_text(record)
    if record.task in ("report", "caption"):
        words = len(re.findall(r"\w+", text))
        if not text.strip():
            found.append(("empty_report", "the report is empty"))
        elif words < s.min_words:
            found.append(("short_report", f"{words} words < {s.min_words}: {text[:80]!r}"))
    extra = record.model_extra or {}
    view = extra.get("view") or extra.get("ViewPosition")
    if s.check_views and record.modality == "cxr" and isinstance(view, str) and view.strip() and \
            view.strip().upper() not in FRONTAL_VIEWS:
        found.append(("non_frontal_view", f"view {view!r} is not frontal ({', '.join(sorted(FRONTAL_VIEWS))})"))
    if s.check_labels and record.modality == "cxr" and record.labels and text.strip() and record.task != "vqa":
        read = label_report(text)
        differ = {k: (v, read[k]) for k, v in record.labels.items()
                  if v in (0, 1) and read.get(k) in (0, 1) and read[k] != v}
        if differ:
            parts = ", ".join(f"{k}: label {a}, report {b}" for k, (a, b) in sorted(differ.items()))
            found.append(("label_disagreement", parts))
    return found


# ------------------------------------------------------------------------------------------------ run


def _relocate(record: Record, src: Path, dst: Path) -> Record:
    """Image paths rewritten from `src`'s folder to `dst`'s (unchanged when they are the same folder)."""
    if src.resolve() == dst.resolve():
        return record
    updates = {name: os.path.relpath(src / value, dst) for name in PATH_FIELDS
               if isinstance(value := getattr(record, name, None), str) and value}
    return record.model_copy(update=updates)


def _owns_image(record: Record) -> bool:
    """Records whose image is theirs alone (see the module docstring): the duplicate checks look at these."""
    return record.image is not None and record.task not in ("vqa", "edit")


def run_qc(manifest: str | Path, out: str | Path, settings: QCSettings | None = None, keep: bool = False,
           image_root: str | Path | None = None) -> QCResult:
    """Check every record of `manifest` and write the cleaned manifest to `out` plus the reports beside it.

    Args:
        manifest: the manifest.jsonl to check (never modified).
        out: the cleaned manifest.jsonl to write (image paths rewritten relative to its folder).
        settings: thresholds (default `QCSettings()`).
        keep: flag problems (`qc_flags` on each record) instead of dropping the records.
        image_root: the folder image paths must stay in (see `manifest.contained_path`).
    """
    manifest, out = Path(manifest), Path(out)
    if out.resolve() == manifest.resolve():
        raise ValueError(f"--out {out} is the input manifest: QC never modifies its input, choose another file")
    s = settings or QCSettings()
    base = manifest.parent
    records, read = read_manifest(manifest, image_root=image_root)
    lines = _record_lines(manifest, records, image_root)
    findings = [Finding(p.reason, p.message, p.id, p.line) for p in read.problems]
    pixel_seen: dict[str, str] = {}
    hashes: list[np.ndarray] = []
    hash_owner: list[tuple[str, str | None]] = []  # (id, pair_id) of each hash
    kept: list[Record] = []
    for record, line in zip(records, lines):
        found: list[tuple[str, str]] = []
        thumb: str | None = None
        for name in ("image", "target_image"):
            value = getattr(record, name)
            if value is None:
                continue
            try:
                array = load_image(contained_path(base, value, image_root))
            except (ImageLoadError, ValueError) as err:
                found.append(("unreadable_image", f"{name}: {getattr(err, 'reason', err)}"))
                continue
            if name != "image":
                continue
            grey = array if array.ndim == 2 else array[..., :3].mean(-1)
            thumb = thumbnail_url(array)
            found += image_problems(grey, array.shape, s)
            if _owns_image(record):
                digest = pixel_hash(array)
                if digest in pixel_seen:
                    found.append(("exact_duplicate", f"the same pixels as record '{pixel_seen[digest]}'"))
                else:
                    pixel_seen[digest] = record.id
                    code = dhash(grey)
                    near = _nearest(code, hashes, hash_owner, record.pair_id)
                    if near is not None and near[1] <= s.near_bits:
                        found.append(("near_duplicate", f"dHash {near[1]} of {code.size} bits from record "
                                                        f"'{near[0]}' (threshold {s.near_bits})"))
                    else:
                        hashes.append(code)
                        hash_owner.append((record.id, record.pair_id))
        found += text_problems(record, s)
        action = "flagged" if keep else "dropped"
        for reason, detail in found:
            findings.append(Finding(reason, detail, record.id, line, record.image, action, thumb))
        cleaned = _clean_text_fields(record)
        if cleaned is not record:
            findings.append(Finding("deid_placeholder", "placeholders removed from the text", record.id, line,
                                    record.image, "cleaned"))
        if found and not keep:
            continue
        if found:
            cleaned = cleaned.model_copy(update={"qc_flags": sorted({r for r, _ in found})})
        kept.append(_relocate(cleaned, base, out.parent))
    write_manifest(kept, out)
    result = QCResult(records=len(records) + read.skipped, kept=len(kept), findings=findings, manifest=out,
                      report_json=out.parent / REPORT_JSON, report_html=out.parent / REPORT_HTML)
    _write_json(result, manifest, s, keep)
    result.report_html.write_text(render_html(result, manifest, s), encoding="utf-8")
    return result


def _record_lines(manifest: Path, records: list[Record], image_root: str | Path | None) -> list[int | None]:
    """The line of each kept record (read_manifest keeps the first of each id)."""
    first: dict[str, int] = {}
    for line, record in iter_numbered(manifest, image_root=image_root):
        first.setdefault(record.id, line)
    return [first.get(r.id) for r in records]


def _nearest(code: np.ndarray, hashes: list[np.ndarray], owners: list[tuple[str, str | None]],
             pair_id: str | None) -> tuple[str, int] | None:
    """(id, distance) of the closest earlier hash, skipping this record's counterfactual partner."""
    if not hashes:
        return None
    distances = (np.stack(hashes) != code).sum(axis=1)
    if pair_id is not None:
        distances = np.where([p == pair_id for _, p in owners], code.size + 1, distances)
    i = int(distances.argmin())
    return owners[i][0], int(distances[i])


def _clean_text_fields(record: Record) -> Record:
    updates = {}
    for name in TEXT_FIELDS:
        value = getattr(record, name)
        if isinstance(value, str) and DEID_PLACEHOLDER.search(value):
            updates[name] = clean_placeholders(value)
    return record.model_copy(update=updates) if updates else record


def _write_json(result: QCResult, manifest: Path, s: QCSettings, keep: bool) -> None:
    data = {
        "input": str(manifest), "output": str(result.manifest), "mode": "flag" if keep else "drop",
        "settings": asdict(s), "records": result.records, "kept": result.kept, "dropped": result.dropped,
        "by_reason": result.by_reason(),
        "findings": [{k: v for k, v in asdict(f).items() if k != "thumbnail"} for f in result.findings],
    }
    result.report_json.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


def render_html(result: QCResult, manifest: Path, s: QCSettings) -> str:
    """A self-contained page (no scripts, images inline): counts per reason, then each reason's records."""
    e = html.escape
    by_reason = result.by_reason()
    rows = "".join(f'<tr><td><a href="#{e(r)}">{e(r)}</a></td><td class="n">{n}</td></tr>' for r, n in by_reason.items())
    sections = []
    for reason in by_reason:
        items = [f for f in result.findings if f.reason == reason]
        cards = []
        for f in items[: max(s.thumbnails, 0) or len(items)]:
            img = f'<img src="{e(f.thumbnail)}" alt="{e(f.id or "")}">' if f.thumbnail else '<div class="none">no image</div>'
            cards.append(f'<figure class="{e(f.action)}">{img}<figcaption><b>{e(f.id or "line " + str(f.line))}</b> '
                         f'<span class="action">{e(f.action)}</span><br>line {f.line}: {e(f.detail)}'
                         '</figcaption></figure>')
        more = f"<p>... and {len(items) - s.thumbnails} more in {REPORT_JSON}</p>" if len(items) > s.thumbnails else ""
        sections.append(f'<section id="{e(reason)}"><h2>{e(reason)} ({len(items)})</h2>'
                        f'<div class="grid">{"".join(cards)}</div>{more}</section>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>QC report: {e(manifest.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; }} .n {{ text-align: right; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; width: 200px; font-size: 12px; border: 1px solid #ddd; padding: 6px; }}
figure img {{ width: 96px; height: 96px; object-fit: contain; background: #000; display: block; }}
figure.dropped {{ border-color: #c33; }} .action {{ color: #c33; }} .none {{ color: #888; }}
</style></head>
<body>
<h1>QC report</h1>
<p>Input <code>{e(str(manifest))}</code>: {result.records} records; kept {result.kept}, dropped {result.dropped}.
Cleaned manifest <code>{e(str(result.manifest))}</code>; every finding in <code>{REPORT_JSON}</code>.</p>
<table id="counts"><tr><th>reason</th><th>count</th></tr>{rows}</table>
{"".join(sections) or "<p>Nothing found.</p>"}
</body></html>
"""
