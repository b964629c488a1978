"""Visual question answering (UniMedVL's VQA evaluation): `medunifier eval vqa --ckpt RUN --data M`.

Every VQA record's question is answered from its image and the answers are scored: accuracy overall, on
closed and on open questions (and open token recall), by modality and by organ.

- `compute_vqa` answers and scores; it returns the figures and one row a question, writes nothing and
  prints nothing (a progress callback reports the questions answered).
- `write_vqa` writes results.json and predictions.jsonl; `print_vqa_table` prints the table.
- `evaluate_vqa` and `run_vqa` are the edges the CLI and the other evaluators call: compute with a
  progress bar, write, print.

How the model answers is in `eval.vqa_answering` (the training layout, candidate likelihoods, greedy,
beam and ranked open answers); how answers are normalised, which candidates a closed question gets and the
metrics are in `eval.vqa_scoring`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rich.console import Console

from medunifier.data.manifest import Record
from medunifier.eval.vqa_answering import _eval_mode, answer_questions
from medunifier.eval.vqa_scoring import (
    ALL_TYPES,
    YES_NO,
    candidate_pool,
    closed_candidates,
    is_closed,
    normalize_answer,
    open_answer_pool,
    pool_coverage,
    question_type,
    record_field,
    vqa_metrics,
    vqa_records,
)

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

__all__ = ["VQAEvaluation", "compute_vqa", "evaluate_vqa", "print_vqa_table", "run_vqa", "write_vqa"]

Progress = Callable[[int, int], None]  # (questions answered so far, questions in all)


@dataclass
class VQAEvaluation:
    """What `compute_vqa` returns.

    Args:
        results: settings and figures (what results.json holds).
        predictions: one row a question, in record order: id, question, reference, prediction, closed,
            candidates (None for a question decoded freely) and correct (normalised exact match).
    """

    results: dict[str, Any]
    predictions: list[dict[str, Any]]


def compute_vqa(
    model: MedUnifier,
    records: Sequence[Record],
    root: str | Path,
    *,
    closed_scoring: Literal["likelihood", "generate"] = "likelihood",
    open_scoring: Literal["generate", "rank"] = "generate",
    top_k: int | None = 128,
    shuffle_images: bool = False,
    closed_calibration: Literal["none", "image-pmi"] = "none",
    reference_images: int = 8,
    train_records: Sequence[Record] | None = None,
    max_length: int = 16,
    num_beams: int = 1,
    batch_size: int = 32,
    num_workers: int = 0,
    limit: int | None = None,
    meta: Mapping[str, Any] | None = None,
    on_progress: Progress | None = None,
) -> VQAEvaluation:
    """Answer every VQA record and score the answers (overall / closed / open, by modality and by organ).

    Args:
        model: the model that answers.
        records: the records to evaluate; those that are not VQA samples with an image are skipped.
        root: the folder the records' image paths are relative to.
        closed_scoring: "likelihood" answers closed questions from candidates (the pool from
            `train_records`; without them, from the evaluated records' own closed answers, noted in the
            results); "generate" decodes them like open ones.
        open_scoring: "generate" decodes open questions; "rank" ranks the training split's open answers
            (`open_answer_pool`; `top_k` shortlisted by the first token; the share of open references in
            that pool is `open_pool.coverage`).
        top_k: the shortlist of ranked open answers (None: the whole pool).
        shuffle_images: ask every question of another question's image (a fixed permutation; the record's
            modality is kept), the control for how much of the accuracy comes from the question alone.
        closed_calibration: "image-pmi" scores each closed candidate by how much more likely the question's
            image makes it than `reference_images` training images do on average (`image_pmi`): an answer
            the question alone favours gains nothing. "none": the raw likelihood.
        reference_images: how many training images (a seeded choice, one per distinct image) the
            calibration averages over.
        train_records: the training split, for the candidate and open-answer pools and the reference images.
        max_length: the most tokens a decoded answer has.
        num_beams: beam width of decoded answers (1: greedy).
        batch_size: questions a batch.
        num_workers: image-loading worker processes.
        limit: evaluate the first `limit` VQA records only.
        meta: entries copied into the results (the checkpoint, the data, the split).
        on_progress: called after each batch with (questions answered, questions in all).
    """
    from medunifier.eval.common import image_batches

    if closed_scoring not in ("likelihood", "generate"):
        raise ValueError(f"closed_scoring must be likelihood or generate, got {closed_scoring!r}")
    if open_scoring not in ("generate", "rank"):
        raise ValueError(f"open_scoring must be generate or rank, got {open_scoring!r}")
    if closed_calibration not in ("none", "image-pmi"):
        raise ValueError(f"closed_calibration must be none or image-pmi, got {closed_calibration!r}")
    if closed_calibration == "image-pmi" and closed_scoring != "likelihood":
        raise ValueError("closed_calibration='image-pmi' calibrates candidate likelihoods: it needs "
                         "closed_scoring='likelihood'")
    if reference_images < 1:
        raise ValueError(f"reference_images must be at least 1 (got {reference_images})")
    start = time.perf_counter()
    records = vqa_records(records)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError("no VQA record (task 'vqa' with an image, a question and an answer) to evaluate")
    closed = [is_closed(r) for r in records]
    pool_source: str | None = "train split"
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

    reference_embeds, reference_ids = None, []
    if closed_calibration == "image-pmi":
        reference_embeds, reference_ids = _reference_embeds(model, train_records or [], root, reference_images)

    predictions: list[str] = []
    image_records = records
    if shuffle_images:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(0)).tolist()
        image_records = [records[i] for i in order]
    if on_progress is not None:
        on_progress(0, len(records))
    for px in image_batches(image_records, root, model, batch_size, num_workers):
        batch = slice(len(predictions), len(predictions) + px.shape[0])
        predictions += answer_questions(model, px, [r.question for r in records[batch]], candidates[batch],
                                        max_length=max_length, num_beams=num_beams, batch_size=4 * batch_size,
                                        modalities=[r.modality for r in records[batch]], open_pool=open_pool,
                                        top_k=top_k, reference_embeds=reference_embeds)
        if on_progress is not None:
            on_progress(len(predictions), len(records))

    references = [r.answer for r in records]
    groups = {"modality": [r.modality for r in records], "organ": [record_field(r, "organ") for r in records]}
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
        "closed_calibration": {"kind": closed_calibration, "reference_ids": reference_ids} if reference_ids else None,
        "open_scoring": open_scoring,
        "shuffled_images": shuffle_images,
        "open_pool": None if open_pool is None else {
            "answers": len(open_pool), "top_k": top_k,
            "coverage": pool_coverage([r.answer for r, c in zip(records, closed) if not c], open_pool)},
        "choice_questions": sum(opts is not None and list(opts) != list(YES_NO) for opts in candidates),
        "metrics": metrics,
        "seconds": time.perf_counter() - start,
    }
    rows = [{"id": r.id, "question": r.question, "reference": r.answer, "prediction": pred, "closed": c,
             "candidates": opts, "correct": normalize_answer(pred) == normalize_answer(r.answer)}
            for r, pred, c, opts in zip(records, predictions, closed, candidates)]
    return VQAEvaluation(results, rows)


def _reference_embeds(model: MedUnifier, train_records: Sequence[Record], root: str | Path,
                      n: int) -> tuple[torch.Tensor, list[str]]:
    """Image features [K, 1 + L, Dv] of K training images (one record per distinct image, a seeded choice:
    the same references for every evaluation of the same training split), and their record ids."""
    from medunifier.eval.common import image_batches

    distinct = list({r.image: r for r in vqa_records(train_records)}.values())
    if not distinct:
        raise ValueError("closed_calibration='image-pmi' needs training records with images for its references")
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(0)).tolist()
    chosen = [distinct[i] for i in order[:n]]
    pixels = next(iter(image_batches(chosen, root, model, batch_size=len(chosen))))
    with _eval_mode(model), torch.no_grad():
        embeds = model.image_features(pixels)
    return embeds, [r.id for r in chosen]


def write_vqa(evaluation: VQAEvaluation, out: str | Path) -> None:
    """results.json and predictions.jsonl (one JSON row a question) into `out`."""
    from medunifier.eval.common import write_results

    write_results(evaluation.results, out)
    with (Path(out) / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for row in evaluation.predictions:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate_vqa(
    model: MedUnifier,
    records: Sequence[Record],
    root: str | Path,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    console: Console | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """`compute_vqa` with a progress bar, its files written into `out` (when given) and its table printed.

    Args:
        model: the model that answers.
        records: the records to evaluate.
        root: the folder the records' image paths are relative to.
        out: the folder for results.json and predictions.jsonl (`write_vqa`); None writes nothing.
        progress: show a progress bar.
        console: where the bar and the table go.
        settings: the keywords of `compute_vqa`.
    Returns the results.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as ProgressBar

    console = console or Console()
    columns = (TextColumn("vqa"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with ProgressBar(*columns, console=console, transient=True, disable=not progress) as bar:
        task = bar.add_task("vqa", total=None)
        evaluation = compute_vqa(model, records, root, **settings,
                                 on_progress=lambda done, total: bar.update(task, completed=done, total=total))
    if out is not None:
        write_vqa(evaluation, out)
    print_vqa_table(evaluation.results, console)
    return evaluation.results


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
