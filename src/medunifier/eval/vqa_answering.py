"""VQA answers from a model: candidate answers scored by likelihood, open answers decoded or ranked.

Visual question answering (UniMedVL's VQA evaluation): answers, closed-question scoring, accuracy.

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
* calibrated closed answers (`reference_embeds`, the image-PMI of CF-VQA's counterfactual reading): each
  candidate's score becomes log p(a | q, I) - log mean_k p(a | q, I_k) over K fixed reference images, so the
  answer is the one this image makes likelier than images in general do, not the one the question alone
  favours. It costs K more scoring passes of the closed questions.
* a model trained with modality embeddings (`encoder.modalities`) gets each question's modality (the
  record's `modality`), as its training samples did; other models ignore it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

__all__ = ["answer_questions", "image_pmi", "modality_ids", "qa_sequences", "rank_answers", "score_candidates"]


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
    pixel_values: Tensor | None,
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
    if pixel_values is None and image_embeds is None:
        raise ValueError("score_candidates needs pixel_values or image_embeds")
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


@torch.no_grad()
def image_pmi(
    model: MedUnifier,
    scores: Sequence[Sequence[float]],
    questions: Sequence[str],
    candidates: Sequence[Sequence[str]],
    reference_embeds: Tensor,
    batch_size: int = 64,
    modalities: Sequence[str] | None = None,
) -> list[list[float]]:
    """Candidate scores minus their log-likelihood averaged over reference images: for each question i and
    candidate a, scores[i][a] - log mean_k p(a | q_i, I_k), with p(a | q, I_k) from `score_candidates`.

    Args:
        scores: `score_candidates` of the questions with their own images.
        reference_embeds: [K, 1 + L, Dv] image features of the K reference images (K >= 1).
    """
    if reference_embeds.ndim != 3 or reference_embeds.shape[0] < 1:
        raise ValueError(f"reference_embeds must be [K >= 1, tokens, width], got {tuple(reference_embeds.shape)}")
    per_reference = [
        score_candidates(model, None, questions, candidates, batch_size,
                         image_embeds=reference_embeds[k : k + 1].expand(len(questions), -1, -1),
                         modalities=modalities)
        for k in range(reference_embeds.shape[0])
    ]
    log_k = math.log(reference_embeds.shape[0])
    out = []
    for i, own in enumerate(scores):
        references = torch.tensor([r[i] for r in per_reference], dtype=torch.float64)  # [K, candidates]
        marginal = torch.logsumexp(references, dim=0) - log_k
        out.append((torch.tensor(own, dtype=torch.float64) - marginal).tolist())
    return out


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
    from medunifier.model.decoding import DecodeOptions, generate

    special = model.special
    from medunifier.data.processor import Processor

    processor = Processor(model.tokenizer, int(model.config.text.max_length))
    ids, mask = processor.question_prefixes(list(questions))  # left-padded "[DEC] question [SEP]"
    ids, mask = ids.to(image_embeds.device), mask.to(image_embeds.device)
    limit = int(model.encoder.config.max_position_embeddings) - ids.shape[1]
    options = DecodeOptions(max_length=max(1, min(max_length, limit)), num_beams=num_beams)
    tokens, _ = generate(model.encoder, image_embeds, bos_id=special["dec"], eos_id=special["sep"],
                         pad_id=special["pad"], options=options, prefix_ids=ids, prefix_mask=mask,
                         continue_prefix=True, **_modality_kwargs(modality))
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
    reference_embeds: Tensor | None = None,
) -> list[str]:
    """One answer per (image, question): pixel_values [B, C, S, S], B questions.

    candidates (one list per question, or None for an open question): the candidate with the highest total
    log-likelihood is returned as given. Open questions are decoded after the question (greedy, or beam
    search with num_beams > 1, at most `max_length` tokens), or, given `open_pool`, answered by ranking the
    pool (`rank_answers`, its `top_k` first-token shortlist). modalities: one per question, for models with
    modality embeddings (see `modality_ids`). reference_embeds [K, 1 + L, Dv]: calibrate the closed answers
    by `image_pmi` against these K reference images.
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
            closed_questions = [questions[i] for i in closed]
            closed_modalities = None if modalities is None else [modalities[i] for i in closed]
            scores = score_candidates(model, pixel_values[closed], closed_questions, options,
                                      batch_size=batch_size, image_embeds=image_embeds[closed],
                                      modalities=closed_modalities)
            if reference_embeds is not None:
                scores = image_pmi(model, scores, closed_questions, options, reference_embeds, batch_size,
                                   closed_modalities)
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
