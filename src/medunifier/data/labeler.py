"""A rule-based, negation-aware chest X-ray report labeler (CheXpert/NegEx style).

`label_report(text)` maps a free-text report to the nine findings of `data/findings.py`:
1 present, 0 absent or not mentioned, -1 uncertain (a hedge: "possible", "cannot be excluded",
"likely", "borderline"). It is used for the clinical-efficacy metrics of report generation and
works on real reports (checked on IU X-Ray) as well as on SynthCXR's.

How a label is decided:
1. The text is lower-cased and cut into clauses at sentence ends, ';' and ':' (not at decimal
   points such as "4.5 cm").
2. Each finding has synonym patterns ("enlarged cardiac silhouette" -> cardiomegaly, "vascular
   congestion" -> edema, "blunting of the costophrenic angle" -> pleural effusion, "PICC" ->
   support devices). Every match is a *mention*.
3. A mention is negated when a negation trigger governs it within its clause: a pre-trigger
   ("no", "without", "negative for", "free of", "no evidence of", "resolved") before it, or a
   post-trigger ("is not seen", "has resolved", "is absent") after it. A scope ends at a
   termination term ("but", "however", "although", "which", "there is"...); a bare "not" reaches
   only a few words. Pseudo-triggers ("no change", "no interval change") are ignored, and a
   trigger inside an uncertainty phrase ("cannot be excluded") does not negate.
4. Otherwise a mention is uncertain when an uncertainty trigger governs it the same way, else
   positive.
5. A finding is 1 if any mention is positive, else -1 if any is uncertain, else 0 (negated or
   never mentioned). no_finding is 1 iff no other finding is positive or uncertain (the CheXpert
   convention; support devices count as a finding here, as in SynthCXR's labels).

Uncertain mentions are reported as `uncertain` (-1 by default; pass 0 or 1 for the U-Zeros /
U-Ones policies).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from medunifier.data.findings import FINDINGS

# ------------------------------------------------------------------------------ mentions (synonyms)

_HEART = r"(?:heart|cardiac (?:silhouette|contour|shadow|size|outline)|heart size)"
MENTION_PATTERNS: dict[str, list[str]] = {
    "atelectasis": [r"atelecta\w*", r"\bcollapsed?\b", r"\bvolume loss\b"],
    "cardiomegaly": [
        r"cardiomegaly",
        r"\bcardiac enlargement\b",
        r"\benlarge(?:d|ment of)(?: the)? " + _HEART,
        _HEART + r"(?:\s+\w+){0,4}?\s+(?:enlarged|increased in size)\b",
    ],
    "consolidation": [r"consolidat\w*", r"\bair[- ]?space (?:disease|opacit\w+|process|infiltrat\w*)",
                      r"\w*pneumonias?\b", r"\binfiltrat\w*"],
    "edema": [r"\bo?edema(?:tous)?\b", r"\b(?:pulmonary |vascular |venous |interstitial )+(?:congestion|engorgement)",
              r"\bchf\b", r"\bheart failure\b", r"\bkerley\b", r"\bcephalization\b", r"\bfluid overload\b"],
    "pleural_effusion": [
        r"(?<!pericardial )(?<!joint )\beffusions?\b",
        r"\bpleural fluid\b",
        r"\bhydro(?:pneumo)?thora\w*",
        r"\bblunt\w*(?: of)?(?: the)?(?: \w+)? (?:costophrenic|cp) (?:angle|sulc|recess)\w*",
        r"\b(?:costophrenic|cp) (?:angle|sulc|recess)\w*(?: \w+){0,3}? blunt\w*",
    ],
    "pneumothorax": [r"\w*pneumothora\w*", r"\bptx\b"],
    "nodule": [r"\bnodul\w*", r"\bmass(?:es)?\b", r"\bmasslike\b", r"\bcoin lesions?\b"],
    "support_devices": [
        r"\bendotracheal\b", r"\bet tubes?\b", r"\bett\b", r"\btracheostomy\b", r"\btrach tube\b",
        r"\b(?:naso|oro)gastric\b", r"\b(?:ng|og|enteric|feeding|dobhoff|chest|nasogastric) tubes?\b",
        r"\bcentral (?:venous )?(?:line|catheter)s?\b", r"\bpicc\b", r"\bperipherally inserted\b",
        r"\b(?:ij|internal jugular|subclavian)(?: central)?(?: venous)? (?:line|catheter|port)s?\b",
        r"\bport-?a-?cath\b", r"\bpacemakers?\b", r"\bpacer\b", r"\baicd\b", r"\bdefibrillator\b",
        r"\bswan[- ]ganz\b", r"\b(?:lines?|tubes?),? (?:and|or) (?:lines?|tubes?)\b", r"\bsupport devices?\b",
        r"\bmedical devices?\b", r"\bcatheters?\b",
    ],
}

# ------------------------------------------------------------------------------ triggers

# pseudo-triggers look like negations but are not ("no change in the effusion")
PSEUDO_NEGATION = [r"\bno (?:interval |significant |substantial )?(?:change|increase|decrease|worsening)\b",
                   r"\bnot (?:significantly )?changed\b", r"\bwithout (?:interval )?change\b"]
PRE_NEGATION = [r"\bno\b", r"\bwithout\b", r"\bnegative for\b", r"\bfree of\b", r"\bclear of\b", r"\babsence of\b",
                r"\bresolution of\b", r"\bresolved\b", r"\bremoval of\b", r"\bnor\b", r"\bnone\b"]
# a bare "not" governs only the next few words ("is not enlarged", "not seen")
SHORT_PRE_NEGATION = [r"\bnot\b", r"\bno longer\b"]
SHORT_SCOPE_WORDS = 4
POST_NEGATION = [
    r"\b(?:not|no longer)(?: \w+)? (?:seen|identified|present|visualized|appreciated|evident|demonstrated|"
    r"noted|detected|visible|enlarged|appreciable)\b",
    r"\b(?:has|have) resolved\b", r"\bresolved\b", r"\b(?:is|are) absent\b", r"\bexcluded\b", r"\bruled out\b",
    r"\bremoved\b", r"\bunlikely\b",
]
PRE_UNCERTAINTY = [
    r"\bpossib(?:le|ly)\b", r"\bprobabl[ey]\b", r"\blikely\b", r"\bquestionabl[ey]\b", r"\bquestion of\b",
    r"\bsuspicious (?:for|of)\b", r"\bsuspect\w*\b", r"\bconcern\w* (?:for|of)\b",
    r"\bmay (?:be|represent|reflect|indicate|relate|have|include)\b", r"\bmight\b",
    r"\bcould (?:be|represent|reflect|indicate)\b", r"\bcan ?not (?:be )?(?:excluded?|ruled out|rule out)\b",
    r"\bdifficult to exclude\b", r"\brule out\b", r"\br/o\b", r"\bevaluate for\b", r"\bto exclude\b",
    r"\bsuggest\w*\b", r"\bborderline\b", r"\bequivocal\b", r"\bindeterminate\b", r"\bversus\b", r"\bvs\b",
    r"\bdifferential\b", r"\bpresum\w*\b", r"\bpotential\b",
]
# after the mention: only phrases that hedge what precedes them ("effusion cannot be excluded")
POST_UNCERTAINTY = [
    r"\bcan ?not (?:be )?(?:excluded|ruled out)\b", r"\bnot (?:be )?(?:excluded|ruled out)\b",
    r"\b(?:is|are) (?:possible|possibly|probable|suspected|questionable|likely|not excluded)\b",
    r"\bversus\b", r"\bvs\b", r"\bor less likely\b", r"\bmay be present\b",
]
TERMINATION = [r"\bbut\b", r"\bhowever\b", r"\balthough\b", r"\bthough\b", r"\bexcept\b", r"\baside from\b",
               r"\bapart from\b", r"\bwhich\b", r"\bwhereas\b", r"\bwhile\b", r"\byet\b",
               r"\bthere (?:is|are|has been|have been)\b", r"\botherwise\b"]


def _compile(patterns: list[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_MENTIONS = {name: _compile(pats) for name, pats in MENTION_PATTERNS.items()}
_PSEUDO = _compile(PSEUDO_NEGATION)
_PRE_NEG = _compile(PRE_NEGATION)
_SHORT_NEG = _compile(SHORT_PRE_NEGATION)
_POST_NEG = _compile(POST_NEGATION)
_PRE_UNCERTAIN = _compile(PRE_UNCERTAINTY)
_POST_UNCERTAIN = _compile(POST_UNCERTAINTY)
_TERMINATION = _compile(TERMINATION)
# clause ends: . ! ? (not inside a number), ; : and line breaks
_CLAUSE_SPLIT = re.compile(r"(?<!\d)\.(?!\d)|\.(?=\s|$)|[!?;:\n]")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Mention:
    """One synonym match: which finding, the matched words, its clause and the decided value."""

    finding: str
    text: str
    clause: str
    value: int  # 1 positive, 0 negated, -1 uncertain


def _spans(pattern: re.Pattern[str], text: str) -> list[tuple[int, int]]:
    return [m.span() for m in pattern.finditer(text)]


def _overlaps(span: tuple[int, int], others: list[tuple[int, int]]) -> bool:
    return any(span[0] < b and a < span[1] for a, b in others)


def _governs_before(triggers: list[tuple[int, int]], start: int, end: int, stops: list[tuple[int, int]],
                    max_words: int | None, clause: str) -> bool:
    """Any trigger before (or inside) the mention [start, end) with no termination term between them."""
    for a, b in triggers:
        if a >= end:
            continue
        if b <= start and any(b <= s and e <= start for s, e in stops):
            continue
        if max_words is not None and b <= start and len(_WORD.findall(clause[b:start])) > max_words:
            continue
        return True
    return False


def _governs_after(triggers: list[tuple[int, int]], end: int, stops: list[tuple[int, int]]) -> bool:
    """Any trigger after the mention with no termination term between them."""
    return any(a >= end and not any(end <= s and e <= a for s, e in stops) for a, _ in triggers)


def _clauses(text: str) -> list[str]:
    text = " ".join(text.lower().split())
    return [c.strip() for c in _CLAUSE_SPLIT.split(text) if c and c.strip()]


def label_mentions(text: str) -> list[Mention]:
    """Every finding mention in `text` with its decided value (for inspection and debugging)."""
    mentions: list[Mention] = []
    for clause in _clauses(text):
        found = [(name, m.span()) for name, pattern in _MENTIONS.items() for m in pattern.finditer(clause)]
        if not found:
            continue
        stops = _spans(_TERMINATION, clause)
        pre_uncertain, post_uncertain = _spans(_PRE_UNCERTAIN, clause), _spans(_POST_UNCERTAIN, clause)
        masked = _spans(_PSEUDO, clause) + pre_uncertain + post_uncertain  # "cannot be excluded" does not negate
        pre = [s for s in _spans(_PRE_NEG, clause) if not _overlaps(s, masked)]
        short = [s for s in _spans(_SHORT_NEG, clause) if not _overlaps(s, masked)]
        post = [s for s in _spans(_POST_NEG, clause) if not _overlaps(s, masked)]
        for name, (start, end) in found:
            negated = (_governs_before(pre, start, end, stops, None, clause)
                       or _governs_before(short, start, end, stops, SHORT_SCOPE_WORDS, clause)
                       or _governs_after(post, end, stops))
            if negated:
                value = 0
            elif (_governs_before(pre_uncertain, start, end, stops, None, clause)
                  or _governs_after(post_uncertain, end, stops)):
                value = -1
            else:
                value = 1
            mentions.append(Mention(name, clause[start:end], clause, value))
    return mentions


def label_report(text: str, uncertain: int = -1) -> dict[str, int]:
    """Labels for the nine findings: 1 present, 0 absent/not mentioned, `uncertain` for hedged mentions."""
    if uncertain not in (-1, 0, 1):
        raise ValueError(f"uncertain must be -1, 0 or 1, got {uncertain}")
    values: dict[str, set[int]] = {name: set() for name in FINDINGS if name != "no_finding"}
    for mention in label_mentions(text):
        values[mention.finding].add(mention.value)
    labels: dict[str, int] = {}
    for name, seen in values.items():
        if 1 in seen:
            labels[name] = 1
        elif -1 in seen:
            labels[name] = -1
        else:
            labels[name] = 0
    labels["no_finding"] = int(all(v == 0 for v in labels.values()))
    if uncertain != -1:
        labels = {name: (uncertain if v == -1 else v) for name, v in labels.items()}
    return {name: labels[name] for name in FINDINGS}


def label_reports(texts: Iterable[str], uncertain: int = -1) -> list[dict[str, int]]:
    """`label_report` for each text."""
    return [label_report(text, uncertain=uncertain) for text in texts]
