"""Split a free-text radiology report into its sections (FINDINGS, IMPRESSION, ...).

Roughly what the official MIMIC-CXR section parser does: a section starts at a line that begins
with an upper-case header followed by a colon ("FINDINGS:", "IMPRESSION:", "FINDINGS AND
IMPRESSION:") and runs to the next header. When a report has neither findings nor impression,
its last paragraph is used as the findings, as the official parser does.
"""

from __future__ import annotations

import re

# A header at the start of a line: capitals, spaces and a few punctuation marks, then a colon.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&(),-]*[A-Z)])[ \t]*:", re.MULTILINE)
FINDINGS_HEADERS = ("FINDINGS", "FINDING", "FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION")
IMPRESSION_HEADERS = ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS")


def split_sections(text: str) -> dict[str, str]:
    """Header (upper case, single spaces) -> section text (whitespace collapsed); first one wins."""
    sections: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = " ".join(match.group(1).split())
        body = " ".join(text[match.end():end].split())
        if name not in sections or not sections[name]:
            sections[name] = body
    return sections


def _last_paragraph(text: str) -> str | None:
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n[ \t]*\n", text)]
    paragraphs = [p for p in paragraphs if p and not _HEADER.match(p) and p.upper() != "FINAL REPORT"]
    return paragraphs[-1] if paragraphs else None


def findings_and_impression(text: str, fallback: bool = True) -> tuple[str | None, str | None]:
    """(findings, impression) of a report; None for a section that is absent or empty."""
    sections = split_sections(text)
    findings = next((sections[h] for h in FINDINGS_HEADERS if sections.get(h)), None)
    impression = next((sections[h] for h in IMPRESSION_HEADERS if sections.get(h)), None)
    if findings is None and impression is None and fallback:
        findings = _last_paragraph(text)
    return findings, impression
