"""Report generation (paper Table 4): beam search, R2Gen-style NLG metrics and clinical efficacy.

Reports are drafted with beam search (3 beams, at most 95 tokens, no repeated trigram by default, as
R2Gen's block_trigrams), then scored against the references with BLEU-1..4, METEOR and ROUGE-L exactly
as R2Gen computes them (pycocoevalcap on cleaned, lower-cased text), and with finding-level
precision / recall / F1 from the project's negation-aware labeler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console

from medunifier.eval import common
from medunifier.eval.common import fmt
from medunifier.eval.metrics import clinical_efficacy, nlg_metrics
from medunifier.model.protocols import ImageTextModel


def reference_text(record, target: Literal["text", "findings", "impression"]) -> str:
    if target == "text":
        return common.record_text(record)
    value = getattr(record, target)
    return value if value else common.record_text(record)


def tokenizer_round_trip(model: ImageTextModel, texts: list[str]) -> list[str]:
    """Texts encoded and decoded by the model's tokenizer (unchanged for a model without one)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return texts
    out: list[str] = []
    for start in range(0, len(texts), 256):
        ids = model.tokenize(texts[start : start + 256])["input_ids"]
        out.extend(tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True))
    return out


def run_report(
    model: ImageTextModel,
    data: str | Path,
    out: str | Path | None = None,
    split: str | None = None,
    target: Literal["text", "findings", "impression"] = "text",
    num_beams: int = 3,
    max_length: int = 95,
    min_length: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 3,
    length_penalty: float = 1.0,
    candidates: int = 1,
    seed: int = 0,
    limit: int | None = None,
    meteor: bool | None = None,
    round_trip_refs: bool = True,
    batch_size: int = 16,
    num_workers: int = 0,
    device: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Generate a report for every record with an image and score it against the record's `target` text.

    NLG metrics compare the generated text with the references after a round trip through the model's
    tokenizer (`round_trip_refs`, as R2Gen does with its own); clinical efficacy labels the original references.
    `candidates` > 1 drafts that many reports per image and keeps the one the model's own ITM, ITC and decoder likelihood score
    highest (`MedUnifier.generate_report`); its nucleus samples are drawn from a generator seeded with `seed`.
    Writes `results.json` and `predictions.jsonl` (id, reference, generated) into `out` when given.
    """
    ckpt, model = common.eval_model(model, device)
    records, root = common.load_split(data, split)
    records = [r for r in records if r.image is not None and reference_text(r, target).strip()]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{data}: no record with an image and a report")
    hyps: list[str] = []
    selection = {}
    if candidates > 1:
        on = next(model.parameters()).device  # the sampling generator lives where the model does
        selection = {"candidates": candidates, "generator": torch.Generator(on).manual_seed(seed)}
    for px in common.image_batches(records, root, model, batch_size, num_workers):
        hyps.extend(model.generate_report(
            px, num_beams=num_beams, max_length=max_length, min_length=min_length,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            length_penalty=length_penalty, **selection,
        ))
    refs = [reference_text(r, target) for r in records]
    # R2Gen scores references decoded from their token ids (truncated at the model's text length); the same
    # round trip through our tokenizer gives references the decoder's spacing, so an exact copy scores 1
    scored_refs = tokenizer_round_trip(model, refs) if round_trip_refs else refs
    results: dict[str, Any] = {
        "task": "report",
        "ckpt": ckpt,
        "data": str(data),
        "split": split,
        "target": target,
        "n": len(records),
        "decoding": {"num_beams": num_beams, "max_length": max_length, "min_length": min_length,
                     "repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size,
                     "length_penalty": length_penalty, "candidates": candidates,
                     "seed": seed if candidates > 1 else None},
        "round_trip_refs": round_trip_refs and getattr(model, "tokenizer", None) is not None,
        "nlg": nlg_metrics(scored_refs, hyps, meteor=meteor),
        "clinical_efficacy": clinical_efficacy(refs, hyps),
    }
    if out is not None:
        common.write_results(results, out)
        with (Path(out) / "predictions.jsonl").open("w", encoding="utf-8") as fh:
            for rec, ref, hyp in zip(records, refs, hyps):
                fh.write(json.dumps({"id": rec.id, "reference": ref, "generated": hyp}, ensure_ascii=False) + "\n")
    print_report_table(results, console)
    return results


def print_report_table(results: dict[str, Any], console: Console | None = None) -> None:
    nlg = results["nlg"]
    names = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L"]
    common.print_table(f"report generation on {results['n']} images, %", names, [[fmt(nlg.get(n)) for n in names]],
                console)
    ce = results["clinical_efficacy"]
    rows = []
    for name, v in ce["per_finding"].items():
        defined = v["support"] or v["predicted"]
        cells = [fmt(v[m]) if defined else "-" for m in ("precision", "recall", "f1")]
        rows.append([name, str(v["support"]), str(v["predicted"]), *cells])
    for avg in ("micro", "macro"):
        rows.append([avg, "", "", fmt(ce[avg]["precision"]), fmt(ce[avg]["recall"]), fmt(ce[avg]["f1"])])
    common.print_table("clinical efficacy (labeler on reference and generated reports), %",
                ["finding", "ref +", "gen +", "precision", "recall", "F1"], rows, console)
