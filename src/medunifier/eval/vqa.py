"""Visual question answering (UniMedVL's VQA evaluation): answers, closed-question scoring, accuracy.

Layout. Training encodes a question-answer sample as "[DEC] question [SEP] answer [SEP]" (the Collator's
`encode_qa`, whose first token the ITG loss switches to [DEC]) under the encoder's "prefix" mask: the
"[DEC] question [SEP]" tokens see each other and the image queries, the answer is causal and only the answer
tokens and the closing [SEP] are scored. Greedy answers and candidate scores use exactly that layout:

* open answers: the prefix "[DEC] question [SEP]" is encoded once with the KV cache, the first answer token
  is read at the prefix's [SEP] and greedy decoding runs until [SEP] (`max_length` tokens at most). Text
  position ids count valid tokens, so a question padded to the batch's longest decodes like the same
  question alone. (num_beams > 1 goes through `medunifier.model.decoding.generate` with
  `continue_prefix=True` on the left-padded prefix from `Processor.question_prefixes`: the same layout.)
* candidate answers: every (question, candidate) pair becomes "[DEC] question [SEP] candidate [SEP]"; one
  teacher-forced pass (in chunks of `batch_size` pairs) gives each candidate its total log-likelihood: the
  sum of log p(token) over the candidate's tokens and its closing [SEP], under the model's raw distribution
  (the one the training loss sees). The closing [SEP] makes "no" and "no evidence" different answers. The
  best-scoring candidate is the answer.
* ranked open answers (`open_scoring="rank"`, BLIP's rank inference): the candidates are the training
  split's distinct open answers (`open_answer_pool`); the first answer token's distribution at the
  prefix's [SEP] shortlists the `top_k` candidates with the likeliest first token, and each is scored as
  above, continuing from the question's KV cache. The answer can only be a training answer: the share of
  open references in the pool (`open_pool.coverage` in the results) bounds open accuracy.
* a model trained with modality embeddings (`encoder.modalities`) gets each question's modality (the
  record's `modality`), as its training samples did; other models ignore it.

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

import dataclasses
import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor

from medunifier.data.manifest import Record

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

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


# ------------------------------------------------------------------------------------------ answers


def normalize_answer(text: str | None) -> str:
    """'The Left  Lung.' -> 'left lung'; 'Two' -> '2'; "patient's" -> 'patients'; '2.5 cm' kept (see module doc)."""
    text = _APOSTROPHES.sub("", str(text or "").lower())
    words = _PUNCTUATION.sub(" ", text).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def is_closed(record: Any) -> bool:
    """A closed question: answer_type CLOSED when the record has an answer_type, else a yes/no answer."""
    answer_type = str(_field(record, "answer_type") or "").strip().upper()
    if answer_type in ("CLOSED", "OPEN"):
        return answer_type == "CLOSED"
    return normalize_answer(_field(record, "answer")) in YES_NO


def question_type(record: Any) -> str:
    """The record's question type (VQA-RAD `question_type`), upper-cased; ALL_TYPES when it has none."""
    return str(_field(record, "question_type") or "").strip().upper() or ALL_TYPES


def candidate_pool(records: Sequence[Any]) -> dict[str, list[str]]:
    """Normalised closed answers of `records` (the training split) by question type; ALL_TYPES holds all."""
    pool: dict[str, set[str]] = defaultdict(set)
    for record in records:
        answer = normalize_answer(_field(record, "answer"))
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


# ------------------------------------------------------------------------------------------ metrics


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


# ----------------------------------------------------------------------------------------- the model


@contextmanager
def _eval_mode(model: MedUnifier) -> Iterator[None]:
    """The model in eval mode (no dropout) for the block, its mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _collator(model: MedUnifier) -> Any:
    from medunifier.data.dataset import Collator

    return Collator(model.tokenizer, max_length=int(model.config.text.max_length))


def _token_ids(model: MedUnifier, texts: Sequence[str]) -> list[list[int]]:
    return model.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def _pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded ids [N, T] and attention mask [N, T]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def qa_sequences(model: MedUnifier, questions: Sequence[str], answers: Sequence[str] | None = None) -> list[tuple[list[int], int]]:
    """("[DEC] question [SEP] answer [SEP]" ids, prefix length) per question, exactly as training builds them
    (the Collator's truncation included). Without answers: the prefix "[DEC] question [SEP]" alone."""
    collator = _collator(model)
    q_ids = _token_ids(model, questions)
    a_ids = _token_ids(model, answers) if answers is not None else [[] for _ in q_ids]
    out = []
    for q, a in zip(q_ids, a_ids):
        seq, prefix = collator.encode_qa(q, a)
        seq = [model.special["dec"], *seq[1:]]
        out.append((seq if answers is not None else seq[:prefix], prefix))
    return out


def modality_ids(model: MedUnifier, modalities: Sequence[str] | None, batch: int) -> Tensor | None:
    """Ids [B] of the encoder's modality embedding for a model trained with one (`encoder.modalities`), so
    that answers see the modality their training samples saw; None otherwise (or when not given)."""
    ids_for = getattr(model, "modality_ids_for", None)
    return None if ids_for is None else ids_for(modalities, batch)


def _modality_kwargs(ids: Tensor | None, rows: Sequence[int] | Tensor | None = None) -> dict[str, Tensor]:
    """The encoder's `modality_ids` keyword (for the given rows), or nothing: models without the feature work."""
    if ids is None:
        return {}
    return {"modality_ids": ids if rows is None else ids[torch.as_tensor(rows, device=ids.device)]}


@torch.no_grad()
def _score_pairs(model: MedUnifier, image_embeds: Tensor, rows: list[int], sequences: list[tuple[list[int], int]],
                 modality: Tensor | None = None) -> Tensor:
    """Total log-likelihood of each sequence's answer tokens (positions >= its prefix): [N]."""
    ids, mask = _pad([s for s, _ in sequences], model.special["pad"], image_embeds.device)
    prefix = torch.tensor([p for _, p in sequences], device=ids.device)
    out = model.encoder(input_ids=ids, attention_mask=mask, image_embeds=image_embeds[rows], mode="prefix",
                        prefix_lengths=prefix, **_modality_kwargs(modality, rows))
    positions = torch.arange(1, ids.shape[1], device=ids.device)[None, :]
    scored = (mask[:, 1:] == 1) & (positions >= prefix[:, None])  # [N, T-1]: state t predicts answer token t+1
    return _summed_logp(model, out.text_states[:, :-1], ids[:, 1:], scored)


def _summed_logp(model: MedUnifier, states: Tensor, targets: Tensor, scored: Tensor) -> Tensor:
    """Per row, the sum of log p(targets[t] | states[t]) over the `scored` positions: states [N, T, H],
    targets and scored [N, T] -> [N]. The LM head runs on the scored positions only (the question
    positions are most of a sequence)."""
    logp = F.log_softmax(model.encoder.lm_logits(states[scored]).float(), dim=-1)  # [K, V]
    token_logp = logp.gather(1, targets[scored][:, None]).squeeze(1)  # [K]
    rows_of = torch.arange(states.shape[0], device=states.device)[:, None].expand_as(scored)[scored]  # [K]
    return torch.zeros(states.shape[0], device=states.device).index_add_(0, rows_of, token_logp)


@torch.no_grad()
def score_candidates(
    model: MedUnifier,
    pixel_values: Tensor,
    questions: Sequence[str],
    candidates: Sequence[Sequence[str]],
    batch_size: int = 64,
    image_embeds: Tensor | None = None,
    modalities: Sequence[str] | None = None,
) -> list[list[float]]:
    """Total log-likelihood of every candidate answer of every question (module doc): one list per question.

    pixel_values [B, C, S, S] (one image per question; or pass `image_embeds` [B, 1 + L, Dv] directly);
    modalities: one per question, used by models with modality embeddings (see `modality_ids`).
    """
    if len(candidates) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(candidates)} candidate lists")
    for options in candidates:
        if not options or any(not str(c).strip() for c in options):
            raise ValueError("every question needs at least one non-empty candidate answer")
    rows = [i for i, options in enumerate(candidates) for _ in options]
    pairs = qa_sequences(model, [questions[i] for i in rows], [str(c) for options in candidates for c in options])
    scores: list[float] = []
    modality = modality_ids(model, modalities, len(questions))
    with _eval_mode(model):
        if image_embeds is None:
            image_embeds = model.image_features(pixel_values)
        for start in range(0, len(pairs), batch_size):
            scores += _score_pairs(model, image_embeds, rows[start : start + batch_size],
                                   pairs[start : start + batch_size], modality).tolist()
    out, k = [], 0
    for options in candidates:
        out.append(scores[k : k + len(options)])
        k += len(options)
    return out


def open_answer_pool(records: Sequence[Any]) -> list[str]:
    """The distinct open answers of `records` (the training split), one per normalised form (its most frequent
    spelling), most frequent first: the candidate list of ranked open answers (BLIP's answer list)."""
    spellings: dict[str, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in records:
        answer = str(_field(record, "answer") or "").strip()
        if normalize_answer(answer) and not is_closed(record):
            spellings[normalize_answer(answer)][answer] += 1
    ranked = sorted(spellings.values(), key=lambda forms: -sum(forms.values()))
    return [max(forms, key=lambda a: (forms[a], -len(a))) for forms in ranked]


@torch.no_grad()
def rank_answers(
    model: MedUnifier,
    image_embeds: Tensor,
    questions: Sequence[str],
    pool: Sequence[str],
    top_k: int | None = 128,
    batch_size: int = 256,
    modality: Tensor | None = None,
) -> tuple[list[str], list[float]]:
    """The answer of every question ranked from `pool` (BLIP's rank inference), and its log-likelihood.

    image_embeds [B, 1 + L, Dv], one row per question. The prefix "[DEC] question [SEP]" is encoded once with
    the KV cache; the first answer token's distribution at its [SEP] keeps the `top_k` candidates whose first
    token is likeliest (all of them with top_k None), and each kept candidate "answer [SEP]" is then scored
    from the cache: the same total log-likelihood as `score_candidates`, without re-encoding the question.
    A candidate that would not fit `text.max_length` after the question is not considered.
    """
    if not pool or any(not str(a).strip() for a in pool):
        raise ValueError("the answer pool needs at least one answer, none of them empty")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1 (or None for the whole pool), got {top_k}")
    special, device = model.special, image_embeds.device
    prompts = qa_sequences(model, questions)
    ids, mask = _pad([s for s, _ in prompts], special["pad"], device)
    lengths = mask.sum(1)  # [B] prefix lengths
    out = model.encoder(input_ids=ids, attention_mask=mask, image_embeds=image_embeds, mode="prefix",
                        prefix_lengths=lengths, use_cache=True, **_modality_kwargs(modality))
    first = out.text_states[torch.arange(len(questions), device=device), lengths - 1]  # [B, H] at each [SEP]
    first_logp = F.log_softmax(model.encoder.lm_logits(first).float(), dim=-1)  # [B, V]

    answers = [[*a, special["sep"]] for a in _token_ids(model, [str(a) for a in pool])]
    first_ids = torch.tensor([a[0] for a in answers], device=device)  # [A]
    size = torch.tensor([len(a) for a in answers], device=device)  # [A]
    room = int(model.config.text.max_length) - lengths  # [B] tokens left after each question
    first_scores = first_logp[:, first_ids].masked_fill(size[None, :] > room[:, None], float("-inf"))  # [B, A]
    k = len(answers) if top_k is None else min(top_k, len(answers))
    kept = first_scores.topk(k, dim=1).indices  # [B, k]
    fits = torch.isfinite(first_scores.gather(1, kept))  # [B, k]
    fit_rows, fit_cols = fits.nonzero(as_tuple=True)
    pairs = list(zip(fit_rows.tolist(), kept[fit_rows, fit_cols].tolist()))  # (question, pool index), row-major

    totals = torch.full((len(questions), len(answers)), float("-inf"), device=device)  # [B, A]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = torch.tensor([r for r, _ in chunk], device=device)
        cache = dataclasses.replace(out.past_key_values).reorder(rows)  # a copy: reorder replaces the lists
        cand, cand_mask = _pad([answers[a] for _, a in chunk], special["pad"], device)  # [N, T]
        states = model.encoder(input_ids=cand[:, :-1], attention_mask=cand_mask[:, :-1], mode="prefix",
                               prefix_lengths=lengths[rows], past_key_values=cache,
                               **_modality_kwargs(modality, rows)).text_states  # [N, T-1, H]
        rest = _summed_logp(model, states, cand[:, 1:], cand_mask[:, 1:] == 1)  # [N]: state j predicts token j + 1
        cols = torch.tensor([a for _, a in chunk], device=device)
        totals[rows, cols] = first_logp[rows, first_ids[cols]] + rest
    best = totals.max(dim=1)
    return [str(pool[i]) for i in best.indices.tolist()], best.values.tolist()


@torch.no_grad()
def _greedy_answers(model: MedUnifier, image_embeds: Tensor, questions: Sequence[str], max_length: int,
                    modality: Tensor | None = None) -> list[list[int]]:
    """Greedy answer tokens after "[DEC] question [SEP]", from the prefix's [SEP] on (the training layout)."""
    from medunifier.model.decoding import process_logits

    special = model.special
    prompts = qa_sequences(model, questions)
    ids, mask = _pad([s for s, _ in prompts], special["pad"], image_embeds.device)
    lengths = mask.sum(1)  # = prefix lengths: the prompt is the whole prefix
    batch = ids.shape[0]
    limit = int(model.encoder.config.max_position_embeddings) - int(lengths.max())
    steps = max(0, min(max_length, limit))
    extra = _modality_kwargs(modality)  # every call: the embedding is added to each new token
    out = model.encoder(input_ids=ids, attention_mask=mask, image_embeds=image_embeds, mode="prefix",
                        prefix_lengths=lengths, use_cache=True, **extra)
    states = out.text_states[torch.arange(batch, device=ids.device), lengths - 1]  # [B, H] at each [SEP]
    cache = out.past_key_values
    generated = torch.empty(batch, 0, dtype=torch.long, device=ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    banned = tuple({special["dec"], special["pad"]} - {special["sep"]})
    for step in range(steps):
        logp = process_logits(model.encoder.lm_logits(states).float(), generated, step, banned_ids=banned,
                              eos_id=special["sep"])
        next_tokens = logp.argmax(-1).masked_fill(finished, special["pad"])  # [B]
        generated = torch.cat([generated, next_tokens[:, None]], dim=1)
        finished = finished | (next_tokens == special["sep"])
        if bool(finished.all()) or step == steps - 1:
            break
        out = model.encoder(input_ids=next_tokens[:, None], attention_mask=torch.ones_like(next_tokens[:, None]),
                            mode="prefix", prefix_lengths=lengths, past_key_values=cache, use_cache=True, **extra)
        states, cache = out.text_states[:, -1], out.past_key_values
    return [[t for t in row if t not in (special["pad"], special["sep"])] for row in generated.tolist()]


@torch.no_grad()
def _beam_answers(model: MedUnifier, image_embeds: Tensor, questions: Sequence[str], max_length: int,
                  num_beams: int, modality: Tensor | None = None) -> list[list[int]]:
    """Beam search through `decoding.generate`, continuing after the "[DEC] question [SEP]" prefix (module doc)."""
    from medunifier.model.decoding import generate

    special = model.special
    from medunifier.data.processor import Processor

    processor = Processor(model.tokenizer, int(model.config.text.max_length))
    ids, mask = processor.question_prefixes(list(questions))  # left-padded "[DEC] question [SEP]"
    ids, mask = ids.to(image_embeds.device), mask.to(image_embeds.device)
    limit = int(model.encoder.config.max_position_embeddings) - ids.shape[1]
    tokens, _ = generate(model.encoder, image_embeds, bos_id=special["dec"], eos_id=special["sep"],
                         pad_id=special["pad"], max_length=max(1, min(max_length, limit)), num_beams=num_beams,
                         prefix_ids=ids, prefix_mask=mask, continue_prefix=True, **_modality_kwargs(modality))
    return [[t for t in row if t not in (special["pad"], special["sep"])] for row in tokens.tolist()]


@torch.no_grad()
def answer_questions(
    model: MedUnifier,
    pixel_values: Tensor,
    questions: Sequence[str],
    candidates: Sequence[Sequence[str] | None] | None = None,
    max_length: int = 16,
    num_beams: int = 1,
    batch_size: int = 64,
    modalities: Sequence[str] | None = None,
    open_pool: Sequence[str] | None = None,
    top_k: int | None = 128,
) -> list[str]:
    """One answer per (image, question): pixel_values [B, C, S, S], B questions.

    candidates (one list per question, or None for an open question): the candidate with the highest total
    log-likelihood is returned as given. Open questions are decoded after the question (greedy, or beam
    search with num_beams > 1, at most `max_length` tokens), or, given `open_pool`, answered by ranking the
    pool (`rank_answers`, its `top_k` first-token shortlist). modalities: one per question, for models with
    modality embeddings (see `modality_ids`).
    """
    if pixel_values.shape[0] != len(questions):
        raise ValueError(f"{pixel_values.shape[0]} images but {len(questions)} questions")
    if candidates is not None and len(candidates) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(candidates)} candidate lists")
    if num_beams < 1 or max_length < 1:
        raise ValueError("num_beams and max_length must be at least 1")
    if any(not str(q).strip() for q in questions):
        raise ValueError("empty question")
    modality = modality_ids(model, modalities, len(questions))
    with _eval_mode(model):
        image_embeds = model.image_features(pixel_values)  # [B, 1 + L, Dv]
        answers: list[str] = [""] * len(questions)
        closed = [i for i in range(len(questions)) if candidates is not None and candidates[i] is not None]
        open_ = sorted(set(range(len(questions))) - set(closed))
        if closed:
            options = [list(candidates[i]) for i in closed]
            scores = score_candidates(model, pixel_values[closed], [questions[i] for i in closed], options,
                                      batch_size=batch_size, image_embeds=image_embeds[closed],
                                      modalities=None if modalities is None else [modalities[i] for i in closed])
            for i, opts, s in zip(closed, options, scores):
                answers[i] = opts[max(range(len(opts)), key=s.__getitem__)]
        if open_:
            qs = [questions[i] for i in open_]
            rows = None if modality is None else modality[torch.tensor(open_, device=modality.device)]
            if open_pool is not None:
                texts, _ = rank_answers(model, image_embeds[open_], qs, open_pool, top_k, batch_size, rows)
            else:
                if num_beams == 1:
                    tokens = _greedy_answers(model, image_embeds[open_], qs, max_length, rows)
                else:
                    tokens = _beam_answers(model, image_embeds[open_], qs, max_length, num_beams, rows)
                texts = model.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            for i, text in zip(open_, texts):
                answers[i] = text.strip()
        return answers


# --------------------------------------------------------------------------------------- evaluation


def _coverage(references: Sequence[str], pool: Sequence[str]) -> float | None:
    """Share of references whose normalised form is in the pool: the ceiling of ranked accuracy."""
    forms = {normalize_answer(a) for a in pool}
    return sum(normalize_answer(r) in forms for r in references) / len(references) if references else None


def vqa_records(records: Sequence[Record]) -> list[Record]:
    """The records that are VQA samples with an image, a question and an answer."""
    return [r for r in records if r.task == "vqa" and r.image is not None and (r.question or "").strip()
            and (r.answer or "").strip()]


def evaluate_vqa(
    model: MedUnifier,
    records: Sequence[Record],
    root: str | Path,
    *,
    out: str | Path | None = None,
    closed_scoring: Literal["likelihood", "generate"] = "likelihood",
    open_scoring: Literal["generate", "rank"] = "generate",
    top_k: int | None = 128,
    shuffle_images: bool = False,
    train_records: Sequence[Record] | None = None,
    max_length: int = 16,
    num_beams: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    limit: int | None = None,
    progress: bool = True,
    console: Console | None = None,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Answer every VQA record and score the answers (overall / closed / open, by modality and by organ).

    Closed questions are answered from candidates (`closed_scoring="likelihood"`, the pool from
    `train_records`; without them, from the evaluated records' own closed answers, noted in the results)
    or decoded like open ones (`"generate"`). Open questions are decoded (`open_scoring="generate"`) or
    ranked from the training split's open answers (`"rank"`, `open_answer_pool`; `top_k` shortlisted by
    the first token; the share of open references in that pool is `open_pool.coverage`). shuffle_images:
    every question is asked of another question's image (a fixed permutation; the record's modality is
    kept), the control for how much of the accuracy comes from the question alone. Writes `results.json` and `predictions.jsonl` (id, question,
    reference, prediction, closed, candidates, correct) into `out` when given; prints a table.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from medunifier.eval.common import image_batches, write_results

    if closed_scoring not in ("likelihood", "generate"):
        raise ValueError(f"closed_scoring must be likelihood or generate, got {closed_scoring!r}")
    if open_scoring not in ("generate", "rank"):
        raise ValueError(f"open_scoring must be generate or rank, got {open_scoring!r}")
    start = time.perf_counter()
    records = vqa_records(records)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError("no VQA record (task 'vqa' with an image, a question and an answer) to evaluate")
    closed = [is_closed(r) for r in records]
    pool_source = "train split"
    if closed_scoring == "likelihood":
        pool = candidate_pool(vqa_records(train_records or []))
        if not pool:
            pool, pool_source = candidate_pool(records), "evaluated records (no training records given)"
        candidates = [closed_candidates(r.question, question_type(r), pool) if c else None
                      for r, c in zip(records, closed)]
    else:
        pool, pool_source, candidates = {}, None, [None] * len(records)
    open_pool = None
    if open_scoring == "rank":
        open_pool = open_answer_pool(vqa_records(train_records or []))
        if not open_pool:
            raise ValueError("open_scoring='rank' needs training records with open answers to rank")

    predictions: list[str] = []
    console = console or Console()
    columns = (TextColumn("vqa"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("vqa", total=len(records))
        image_records = records
        if shuffle_images:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
            image_records = [records[i] for i in order]
        for px in image_batches(image_records, root, model, batch_size, num_workers):
            batch = slice(len(predictions), len(predictions) + px.shape[0])
            predictions += answer_questions(model, px, [r.question for r in records[batch]], candidates[batch],
                                            max_length=max_length, num_beams=num_beams, batch_size=4 * batch_size,
                                            modalities=[r.modality for r in records[batch]], open_pool=open_pool,
                                            top_k=top_k)
            bar.advance(task, px.shape[0])

    references = [r.answer for r in records]
    groups = {"modality": [r.modality for r in records], "organ": [_field(r, "organ") for r in records]}
    metrics = vqa_metrics(predictions, references, closed, groups)
    with_options = [(normalize_answer(ref), opts) for ref, opts in zip(references, candidates) if opts is not None]
    coverage = (sum(ref in opts for ref, opts in with_options) / len(with_options)) if with_options else None
    results: dict[str, Any] = {
        "task": "vqa",
        **dict(meta or {}),
        "n": len(records),
        "closed_scoring": closed_scoring,
        "decoding": {"max_length": max_length, "num_beams": num_beams},
        "candidate_pool": {"source": pool_source, "answers": len(pool.get(ALL_TYPES, []))} if pool_source else None,
        "candidate_coverage": coverage,
        "open_scoring": open_scoring,
        "shuffled_images": shuffle_images,
        "open_pool": None if open_pool is None else {
            "answers": len(open_pool), "top_k": top_k,
            "coverage": _coverage([r.answer for r, c in zip(records, closed) if not c], open_pool)},
        "choice_questions": sum(opts is not None and list(opts) != list(YES_NO) for opts in candidates),
        "metrics": metrics,
        "seconds": time.perf_counter() - start,
    }
    if out is not None:
        write_results(results, out)
        with (Path(out) / "predictions.jsonl").open("w", encoding="utf-8") as fh:
            for r, pred, c, opts in zip(records, predictions, closed, candidates):
                fh.write(json.dumps({"id": r.id, "question": r.question, "reference": r.answer, "prediction": pred,
                                     "closed": c, "candidates": opts,
                                     "correct": normalize_answer(pred) == normalize_answer(r.answer)},
                                    ensure_ascii=False) + "\n")
    print_vqa_table(results, console)
    return results


def run_vqa(
    ckpt: Any,
    data: str | Path,
    out: str | Path | None = None,
    split: str | None = "val",
    device: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`evaluate_vqa` on a manifest's `split` (a single-split manifest is used whole), with the closed-answer
    pool from the same manifest's train split; `ckpt` is a run folder (or a loaded model)."""
    from medunifier.data.manifest import load_records
    from medunifier.eval.common import load_split
    from medunifier.model import load_model

    model, ckpt_name = ckpt, None
    if isinstance(ckpt, (str, Path)):
        ckpt_name, model = str(ckpt), load_model(ckpt, device)
    records, root = load_split(data, split)
    evaluated = {r.id for r in records}
    train = [r for r in load_records(data) if r.split == "train" and r.id not in evaluated]
    return evaluate_vqa(model, records, root, out=out, train_records=train,
                        meta={"ckpt": ckpt_name, "data": str(data), "split": split}, **kwargs)


def print_vqa_table(results: dict[str, Any], console: Console | None = None) -> None:
    """Overall, then one row per modality and per organ: counts and accuracies in %."""
    from rich.table import Table

    from medunifier.eval.common import fmt

    title = f"VQA on {results['n']} questions (closed: {results['closed_scoring']}"
    table = Table(title=f"{title}, open: {results.get('open_scoring', 'generate')}), %")
    table.add_column("slice", no_wrap=True)
    for col in ("n", "acc", "closed", "closed acc", "open", "open acc", "open recall"):
        table.add_column(col, justify="right")

    def add(name: str, m: Mapping[str, Any]) -> None:
        table.add_row(name, str(m["n"]), fmt(m["accuracy"]), str(m["n_closed"]), fmt(m["closed_accuracy"]),
                      str(m["n_open"]), fmt(m["open_accuracy"]), fmt(m["open_token_recall"]))

    metrics = results["metrics"]
    add("overall", metrics)
    for group, slices in metrics["groups"].items():
        table.add_section()
        for label, m in slices.items():
            add(f"{group}={label}", m)
    (console or Console()).print(table)
