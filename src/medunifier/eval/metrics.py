"""Metric functions for every evaluator, with the definitions the papers use (design.md section 5).

Pure functions on arrays: nothing here loads a model or a file.

- retrieval: `precision_at_k` ("mAP@K" of PRIOR / CXR-CLIP: the share of the top K candidates that
  belong to the query's class, averaged over queries), `recall_at_k` and `mean_rank` for the exact pair
  (query i's pair is candidate i).
- zero-shot: `zero_shot_scores` (image-to-prompt similarity with a prompt ensemble per class) and
  `classification_metrics` (accuracy, macro-F1, one-vs-rest AUROC).
- report generation: `nlg_metrics` (BLEU-1..4, METEOR, ROUGE-L computed the R2Gen way with pycocoevalcap
  on cleaned, lower-cased text) and `clinical_efficacy` (finding-level P/R/F1 from the report labeler).
- `mean_std` for seeds.

Ties in a similarity row are broken by candidate index (a stable sort), so a constant similarity
matrix scores as chance, never as perfect.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

ArrayLike = np.ndarray | Tensor | Sequence[Any]


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------------------------------- retrieval


def ranking(sim: ArrayLike) -> np.ndarray:
    """Candidate indices of each row sorted by decreasing similarity, ties by index: [Nq, Nc]."""
    sim = _numpy(sim).astype(np.float64)
    return np.argsort(-sim, axis=1, kind="stable")


def precision_at_k(
    sim: ArrayLike, query_classes: ArrayLike, candidate_classes: ArrayLike, ks: Iterable[int] = (1, 5, 10)
) -> dict[int, float]:
    """PRIOR / CXR-CLIP "mAP@K": mean over queries of (same-class candidates among the top K) / K.

    sim [Nq, Nc]; query_classes [Nq] and candidate_classes [Nc] hold any comparable class labels.
    """
    order = ranking(sim)  # [Nq, Nc]
    q = _numpy(query_classes)
    c = _numpy(candidate_classes)
    if order.shape != (len(q), len(c)):
        raise ValueError(f"similarity {order.shape} does not match {len(q)} queries x {len(c)} candidates")
    hits = c[order] == q[:, None]  # [Nq, Nc] bool, in rank order
    out = {}
    for k in ks:
        if not 1 <= k <= order.shape[1]:
            raise ValueError(f"K={k} must lie in [1, {order.shape[1]}] (the number of candidates)")
        out[int(k)] = float(hits[:, :k].mean(axis=1).mean())
    return out


def pair_ranks(sim: ArrayLike) -> np.ndarray:
    """1-based rank of candidate i in row i (the exact pair) for a square similarity: [N]."""
    order = ranking(sim)
    n = order.shape[0]
    if order.shape[1] < n:
        raise ValueError(f"exact-pair ranks need at least as many candidates as queries, got {order.shape}")
    return np.argmax(order == np.arange(n)[:, None], axis=1) + 1


def recall_at_k(sim: ArrayLike, ks: Iterable[int] = (1, 5, 10)) -> dict[int, float]:
    """Share of queries whose own pair (candidate i for query i) is in the top K."""
    ranks = pair_ranks(sim)
    return {int(k): float((ranks <= k).mean()) for k in ks}


def mean_rank(sim: ArrayLike) -> float:
    """Mean 1-based rank of the exact pair (1 is perfect, (N + 1) / 2 is chance)."""
    return float(pair_ranks(sim).mean())


def median_rank(sim: ArrayLike) -> float:
    return float(np.median(pair_ranks(sim)))


# ------------------------------------------------------------------------------------------ zero-shot


def image_text_similarity(image_emb: Tensor, text_emb: Tensor) -> Tensor:
    """Cosine similarity [Bi, Bt] of normalised embeddings; [Bi, Q, E] images take the max over queries."""
    if image_emb.ndim == 3:
        return torch.einsum("iqe,te->itq", image_emb, text_emb).amax(dim=-1)
    return image_emb @ text_emb.t()


def zero_shot_scores(
    image_emb: Tensor,
    prompt_embs_per_class: Sequence[Tensor] | Mapping[str, Tensor],
    ensemble: Literal["mean", "max", "embedding"] = "mean",
) -> Tensor:
    """Class scores [N, C] from a prompt ensemble per class.

    image_emb [N, Q, E] (per-query, max over queries) or [N, E]; prompt_embs_per_class: C tensors [P_c, E],
    all L2-normalised. "mean" / "max" average or take the max of the image-to-prompt similarities of a class
    (GLoRIA); "embedding" averages the class's prompt embeddings, renormalises, then takes one similarity (CLIP).
    """
    prompts = list(prompt_embs_per_class.values()) if isinstance(prompt_embs_per_class, Mapping) else list(
        prompt_embs_per_class
    )
    columns = []
    for emb in prompts:  # emb [P_c, E]
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ValueError(f"each class needs a [P, E] tensor of at least one prompt, got {tuple(emb.shape)}")
        if ensemble == "embedding":
            mean = torch.nn.functional.normalize(emb.float().mean(0, keepdim=True), dim=-1)  # [1, E]
            columns.append(image_text_similarity(image_emb.float(), mean)[:, 0])
            continue
        sim = image_text_similarity(image_emb.float(), emb.float())  # [N, P_c]
        if ensemble == "mean":
            columns.append(sim.mean(dim=1))
        elif ensemble == "max":
            columns.append(sim.amax(dim=1))
        else:
            raise ValueError(f"ensemble must be 'mean', 'max' or 'embedding', got {ensemble!r}")
    return torch.stack(columns, dim=1)  # [N, C]


def auroc(y_true: ArrayLike, score: ArrayLike) -> float | None:
    """Binary AUROC, or None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = _numpy(y_true).astype(int)
    if len(np.unique(y)) < 2:
        return None
    return float(roc_auc_score(y, _numpy(score).astype(np.float64)))


def classification_metrics(
    y_true: ArrayLike, scores: ArrayLike, class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy and macro-F1 of argmax(scores), and AUROC, for single-label classification.

    scores [N, C]: logits, probabilities or similarities (higher = more likely). AUROC: with two classes the
    binary AUROC of scores[:, 1] - scores[:, 0] (the log-odds when the scores are logits); with more, the
    mean of one-vs-rest AUROCs of each class's column (equal to sklearn's "ovr" macro for probabilities).
    A class absent from y_true has no AUROC and is left out of the macro mean.
    """
    from sklearn.metrics import confusion_matrix, f1_score

    y = _numpy(y_true).astype(int)
    s = _numpy(scores).astype(np.float64)
    if s.ndim != 2 or s.shape[0] != len(y):
        raise ValueError(f"scores must be [N, C] with N = {len(y)}, got {s.shape}")
    num_classes = s.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    pred = s.argmax(axis=1)
    labels = list(range(num_classes))
    per_class = {names[c]: auroc(y == c, s[:, c]) for c in labels}
    if num_classes == 2:
        overall = auroc(y == 1, s[:, 1] - s[:, 0])
    else:
        present = [v for v in per_class.values() if v is not None]
        overall = float(np.mean(present)) if present else None
    return {
        "n": len(y),
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "auroc": overall,
        "auroc_per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
        "classes": names,
    }


# -------------------------------------------------------------------------------- report generation

# R2Gen's sentence cleaner deletes these characters. Its regex is '[.,?;*!%^&_+():-\[\]{}]', where ':-\['
# is a range: ':' ';' '<' '=' '>' '?' '@', the capitals A-Z and '['. Text is lower-cased first, so the
# capitals never matter; the set below spells that range out.
_R2GEN_DELETE = re.compile(r"[.,?;*!%^&_+()\[\]{}:<=>@A-Z]")


def clean_report(text: str) -> str:
    """Lower-case and tokenise a report exactly as R2Gen's tokenizer does before scoring.

    R2Gen (clean_report_mimic_cxr, a superset of the IU X-Ray cleaner): newlines to spaces, runs of '_',
    ' ' and '.' collapsed, list numbers '1. '..'5. ' dropped, split into sentences on '. ', quotes, slashes
    and the punctuation above deleted, sentences joined with ' . ' and a final ' .'.
    """
    t = text.replace("\n", " ")
    for _ in range(7):
        t = t.replace("__", "_")
    for _ in range(6):
        t = t.replace("  ", " ")
    for _ in range(8):
        t = t.replace("..", ".")
    t = t.replace("1. ", "")
    for n in "2345":
        t = t.replace(f". {n}. ", ". ")
    for n in "2345":
        t = t.replace(f" {n}. ", ". ")
    sentences = t.strip().lower().split(". ")
    cleaned = []
    for sent in sentences:
        sent = sent.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
        cleaned.append(_R2GEN_DELETE.sub("", sent))
    return " . ".join(cleaned) + " ."


def r2gen_text(text: str) -> str:
    """The string R2Gen scores: `clean_report`, split on whitespace (its tokenizer) and joined by single spaces
    (its decoder)."""
    return " ".join(clean_report(text).split())


def java_available() -> bool:
    return shutil.which("java") is not None


_METEOR: Any = None


def meteor_scorer() -> Any:
    """pycocoevalcap's Meteor, started once per process (its JVM takes seconds to load the paraphrase table)."""
    global _METEOR
    if _METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def nlg_metrics(
    refs: Sequence[str], hyps: Sequence[str], meteor: bool | None = None, clean: bool = True
) -> dict[str, float | None]:
    """BLEU_1..BLEU_4, METEOR and ROUGE_L as R2Gen's compute_scores: pycocoevalcap on {i: [text]} dicts.

    Both sides go through `r2gen_text` (R2Gen scores its tokenizer's decoded, cleaned text). METEOR runs
    the pycocoevalcap jar in a JVM: `meteor=None` runs it when `java` is on PATH and otherwise reports None.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:
        raise ImportError("report metrics need pycocoevalcap: pip install 'medunifier[eval]'") from err
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no reports to score")
    prep = r2gen_text if clean else (lambda s: s)
    gts = {i: [prep(r)] for i, r in enumerate(refs)}
    res = {i: [prep(h)] for i, h in enumerate(hyps)}
    out: dict[str, float | None] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, value in enumerate(bleu, start=1):
        out[f"BLEU_{n}"] = float(value)
    run_meteor = java_available() if meteor is None else meteor
    if run_meteor:
        out["METEOR"] = float(meteor_scorer().compute_score(gts, res)[0])
    else:
        out["METEOR"] = None
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    return out


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def clinical_efficacy(
    refs: Sequence[str],
    hyps: Sequence[str],
    labeler: Callable[[str], Mapping[str, int]] | None = None,
    findings: Sequence[str] | None = None,
    uncertain: Literal["negative", "positive"] = "negative",
) -> dict[str, Any]:
    """Finding-level precision / recall / F1 of generated reports against references (CE metrics).

    Both texts are labelled by the rule-based, negation-aware labeler (`medunifier.data.labeler.label_report`
    unless one is given). A finding is positive when labelled 1; an uncertain mention (-1) counts as
    negative by default (`uncertain="positive"` counts it as present), and how many -1 labels occurred is
    reported. Micro sums TP/FP/FN over findings; macro averages each finding's P/R/F1 over the `findings`
    present in the references or the generated reports (a finding absent from both is undefined).
    """
    if labeler is None:
        from medunifier.data.labeler import label_report as labeler
    if findings is None:
        from medunifier.data.findings import FINDINGS as findings
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    positive = {1, -1} if uncertain == "positive" else {1}
    ref_labels = [labeler(r) for r in refs]
    hyp_labels = [labeler(h) for h in hyps]
    uncertain_counts = {
        "reference": sum(v == -1 for lab in ref_labels for v in lab.values()),
        "generated": sum(v == -1 for lab in hyp_labels for v in lab.values()),
    }
    per_finding: dict[str, dict[str, float]] = {}
    totals = np.zeros(3, dtype=np.int64)  # tp, fp, fn
    for name in findings:
        y = np.array([lab.get(name, 0) in positive for lab in ref_labels], dtype=bool)
        p = np.array([lab.get(name, 0) in positive for lab in hyp_labels], dtype=bool)
        tp, fp, fn = int((y & p).sum()), int((~y & p).sum()), int((y & ~p).sum())
        totals += (tp, fp, fn)
        per_finding[name] = {**_prf(tp, fp, fn), "support": int(y.sum()), "predicted": int(p.sum())}
    # a finding absent from both sides has no defined P/R/F1: it is left out of the macro mean
    scored = [name for name, v in per_finding.items() if v["support"] or v["predicted"]]
    macro = {m: float(np.mean([per_finding[n][m] for n in scored])) if scored else 0.0
             for m in ("precision", "recall", "f1")}
    return {
        "micro": _prf(*(int(t) for t in totals)),
        "macro": macro,
        "macro_findings": scored,
        "per_finding": per_finding,
        "uncertain_labels": uncertain_counts,
        "uncertain_as": uncertain,
        "n": len(refs),
    }


# ----------------------------------------------------------------------------------------------- seeds


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of the non-missing values."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def format_mean_std(stat: Mapping[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    """'83.2 ± 1.4' (scaled, e.g. to percent); '-' when missing."""
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"
