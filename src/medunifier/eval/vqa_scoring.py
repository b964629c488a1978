"""VQA answers compared and scored: answer normalisation, the closed-question candidate rule, the answer pools
of the training split and the accuracy metrics. Pure functions on strings and records, no model.

Closed questions are answered from candidates by default (`closed_scoring="likelihood"`); the candidate
rule (`closed_candidates`) looks at the question only, never at its reference answer:

* the pool is the closed answers of the training split (normalised), by question type (VQA-RAD's
  `question_type`, e.g. PRES, POS), plus all of them together;
* a question that contains " or " and names two or more pool answers (those of its own question type first,
  else any closed answer; an option inside a longer named one, "left" in "left side", is dropped) is a
  choice question: its candidates are the named options ("Is the lesion on the left or right?" -> left,
  right);
* every other closed question is a yes/no question: candidates ["yes", "no"].

`candidate_coverage` in the results is the share of closed questions whose reference answer is among its
candidates, the ceiling of closed accuracy under this rule.

Scoring (`normalize_answer`): answers are compared after lower-casing, removing apostrophes, turning other
punctuation into spaces (a decimal point or comma between digits is kept), spelling number words zero to
twenty as digits, dropping the articles a/an/the and collapsing spaces. Closed and open accuracy are exact
matches of normalised answers; open token recall is, per open question, the fraction of the reference's
normalised tokens that occur in the prediction, averaged over open questions.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from medunifier.data.manifest import Record

__all__ = [
    "ALL_TYPES", "ARTICLES", "NUMBER_WORDS", "YES_NO", "candidate_pool", "closed_candidates", "is_closed",
    "normalize_answer", "open_answer_pool", "pool_coverage", "question_type", "record_field", "vqa_metrics",
    "vqa_records",
]

YES_NO = ("yes", "no")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
    )
}
_APOSTROPHES = re.compile(r"['\u2019`]")
_PUNCTUATION = re.compile(r"(?<!\d)[.,]|[.,](?!\d)|[^\w\s.,]|_")  # keeps '.' and ',' between digits
ALL_TYPES = "*"  # pool key of every closed answer, whatever its question type


def normalize_answer(text: str | None) -> str:
    """'The Left  Lung.' -> 'left lung'; 'Two' -> '2'; "patient's" -> 'patients'; '2.5 cm' kept (see module doc)."""
    text = _APOSTROPHES.sub("", str(text or "").lower())
    words = _PUNCTUATION.sub(" ", text).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def record_field(record: Any, name: str) -> Any:
    """Field `name` of a record given as a mapping or as an object (a manifest `Record`); None when absent."""
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def is_closed(record: Any) -> bool:
    """A closed question: answer_type CLOSED when the record has an answer_type, else a yes/no answer."""
    answer_type = str(record_field(record, "answer_type") or "").strip().upper()
    if answer_type in ("CLOSED", "OPEN"):
        return answer_type == "CLOSED"
    return normalize_answer(record_field(record, "answer")) in YES_NO


def question_type(record: Any) -> str:
    """The record's question type (VQA-RAD `question_type`), upper-cased; ALL_TYPES when it has none."""
    return str(record_field(record, "question_type") or "").strip().upper() or ALL_TYPES


def candidate_pool(records: Sequence[Any]) -> dict[str, list[str]]:
    """Normalised closed answers of `records` (the training split) by question type; ALL_TYPES holds all."""
    pool: dict[str, set[str]] = defaultdict(set)
    for record in records:
        answer = normalize_answer(record_field(record, "answer"))
        if answer and is_closed(record):
            pool[question_type(record)].add(answer)
            pool[ALL_TYPES].add(answer)
    return {key: sorted(answers) for key, answers in pool.items()}


def closed_candidates(question: str, qtype: str | None = None, pool: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The answer options of a closed question: the options it names ("A or B"), else yes/no (module doc)."""
    text = f" {normalize_answer(question)} "
    if " or " in text and pool:
        for key in (qtype or ALL_TYPES, ALL_TYPES):
            named = [a for a in pool.get(key, ()) if a not in YES_NO and f" {a} " in text]
            named = [a for a in named if not any(a != b and f" {a} " in f" {b} " for b in named)]
            if len(named) >= 2:
                return named
    return list(YES_NO)


def open_answer_pool(records: Sequence[Any]) -> list[str]:
    """The distinct open answers of `records` (the training split), one per normalised form (its most frequent
    spelling), most frequent first: the candidate list of ranked open answers (BLIP's answer list)."""
    spellings: dict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in records:
        answer = str(record_field(record, "answer") or "").strip()
        if normalize_answer(answer) and not is_closed(record):
            spellings[normalize_answer(answer)][answer] += 1
    ranked = sorted(spellings.values(), key=lambda forms: -sum(forms.values()))
    return [max(forms, key=lambda a: (forms[a], -len(a))) for forms in ranked]


def _slice_metrics(preds: list[str], refs: list[str], closed: list[bool]) -> dict[str, Any]:
    correct = [p == r for p, r in zip(preds, refs)]
    closed_hits = [c for c, k in zip(correct, closed) if k]
    open_hits = [c for c, k in zip(correct, closed) if not k]
    recalls = []
    for p, r, k in zip(preds, refs, closed):
        if not k:
            ref_tokens, pred_tokens = r.split(), set(p.split())
            recalls.append(sum(t in pred_tokens for t in ref_tokens) / len(ref_tokens) if ref_tokens else float(not p))

    def mean(xs: list[float] | list[bool]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "n": len(preds),
        "n_closed": len(closed_hits),
        "n_open": len(open_hits),
        "accuracy": mean(correct),
        "closed_accuracy": mean(closed_hits),
        "open_accuracy": mean(open_hits),
        "open_token_recall": mean(recalls),
    }


def vqa_metrics(
    predictions: Sequence[str],
    references: Sequence[str],
    closed_flags: Sequence[bool],
    groups: Mapping[str, Sequence[str | None]] | None = None,
) -> dict[str, Any]:
    """Accuracy of normalised answers: overall, closed, open (+ open token recall), counts; per group too.

    groups maps a grouping name (e.g. "modality", "organ") to one label per question (None -> "unknown").
    Returns {n, n_closed, n_open, accuracy, closed_accuracy, open_accuracy, open_token_recall,
    groups: {name: {label: the same keys}}}; an accuracy over no question is None.
    """
    n = len(predictions)
    if len(references) != n or len(closed_flags) != n:
        raise ValueError(f"{n} predictions, {len(references)} references, {len(closed_flags)} closed flags")
    preds = [normalize_answer(p) for p in predictions]
    refs = [normalize_answer(r) for r in references]
    closed = [bool(c) for c in closed_flags]
    out = _slice_metrics(preds, refs, closed)
    out["groups"] = {}
    for name, labels in (groups or {}).items():
        if len(labels) != n:
            raise ValueError(f"group '{name}' has {len(labels)} labels for {n} questions")
        members: dict[str, list[int]] = defaultdict(list)
        for i, label in enumerate(labels):
            members[str(label) if label not in (None, "") else "unknown"].append(i)
        out["groups"][name] = {
            label: _slice_metrics([preds[i] for i in idx], [refs[i] for i in idx], [closed[i] for i in idx])
            for label, idx in sorted(members.items())
        }
    return out


def pool_coverage(references: Sequence[str], pool: Sequence[str]) -> float | None:
    """Share of references whose normalised form is in the pool: the ceiling of ranked accuracy."""
    forms = {normalize_answer(a) for a in pool}
    return sum(normalize_answer(r) in forms for r in references) / len(references) if references else None


def vqa_records(records: Sequence[Record]) -> list[Record]:
    """The records that are VQA samples with an image, a question and an answer."""
    return [r for r in records if r.task == "vqa" and r.image is not None and (r.question or "").strip()
            and (r.answer or "").strip()]
