"""Image-text retrieval on a 5x200-style set (paper Table 2).

Every record gives one image and its report; the class of both is the record's one positive
competition finding. Image-to-text ranks all reports for each image (and text-to-image all images for
each report) by the model's ITC similarity (max over queries of the cosine). With `rerank=K`, the top K
candidates of each query are re-ordered by ITM, as BLIP and BLIP-2 retrieve: score = the ITM head's match
log-odds + the ITC similarity, and the K stay ahead of the rest, which keep their ITC order. Scores: "mAP@K" as PRIOR /
CXR-CLIP define it (precision@K with same-class hits, averaged over queries), Recall@K of the exact pair, and
the mean / median rank of the exact pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from torch import Tensor

from medunifier.eval.common import (
    chunked_similarity,
    classify_records,
    encode_images,
    encode_texts,
    eval_model,
    fmt,
    image_batches,
    load_split,
    print_table,
    record_text,
    write_results,
)
from medunifier.eval.metrics import mean_rank, median_rank, precision_at_k, recall_at_k
from medunifier.model.protocols import ImageTextModel

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

RERANK_OFFSET = 1e4  # subtracted from the pairs outside the re-ranked K, so the K stay ahead of them


def retrieval_scores(sim, classes, ks: Sequence[int] = (1, 5, 10), sim_t2i=None) -> dict[str, Any]:
    """Both directions from one square image-by-text similarity [N, N] whose pairs lie on the diagonal
    (`sim_t2i` [N texts, N images]: text-to-image scores of their own, e.g. re-ranked; default sim.T)."""
    out = {}
    for direction, matrix in (("image_to_text", sim), ("text_to_image", sim.T if sim_t2i is None else sim_t2i)):
        ks_ok = [k for k in ks if k <= matrix.shape[1]]
        out[direction] = {
            "precision_at_k": precision_at_k(matrix, classes, classes, ks_ok),
            "recall_at_k": recall_at_k(matrix, ks_ok),
            "mean_rank": mean_rank(matrix),
            "median_rank": median_rank(matrix),
        }
    return out


@torch.no_grad()
def itm_rerank(model: MedUnifier, vision_tokens: Tensor, tokens: dict[str, Tensor], sim: Tensor, k: int,
               batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """Re-rank the top `k` ITC candidates of every query by ITM, in both directions.

    Args:
        model: a model with `itm_logits(None, input_ids, attention_mask, image_embeds=...)` (MedUnifier).
        vision_tokens: every image's vision tokens [Ni, N, D] (`image_features`), on the CPU.
        tokens: the tokenised texts, {"input_ids", "attention_mask"} [Nt, L], on the CPU.
        sim: ITC similarity [Ni, Nt].
        k: candidates per query (at most the other side's count).
    Returns (image-to-text scores [Ni, Nt], text-to-image scores [Nt, Ni]): a candidate scores its ITM match
    log-odds + ITC similarity, every other pair its ITC similarity - RERANK_OFFSET. (Log-odds, not the match
    probability: the probability saturates near 1 for every plausible candidate and leaves ITC to decide.)
    """
    device = next(model.parameters()).device

    def scores(image_idx: Tensor, text_idx: Tensor) -> Tensor:  # [P] ITM match log-odds of the pairs
        out = []
        for start in range(0, image_idx.numel(), batch_size):
            i, t = image_idx[start:start + batch_size], text_idx[start:start + batch_size]
            logits = model.itm_logits(None, tokens["input_ids"][t].to(device), tokens["attention_mask"][t].to(device),
                                      image_embeds=vision_tokens[i].to(device)).float().cpu()  # [P, 2]
            out.append(logits[:, 1] - logits[:, 0])
        return torch.cat(out)

    ranked = []
    for matrix, images_are_queries in ((sim, True), (sim.T, False)):
        kk = min(k, matrix.shape[1])
        cand = matrix.topk(kk, dim=1).indices  # [Nq, kk]
        rows = torch.arange(matrix.shape[0]).repeat_interleave(kk)
        cols = cand.flatten()
        itm = scores(rows, cols) if images_are_queries else scores(cols, rows)
        out = matrix - RERANK_OFFSET
        out[rows, cols] = itm + matrix[rows, cols]
        ranked.append(out)
    return ranked[0], ranked[1]


def run_retrieval(
    model: ImageTextModel,
    data: str | Path,
    out: str | Path | None = None,
    classes: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    split: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    console: Console | None = None,
    rerank: int = 0,
) -> dict[str, Any]:
    """Evaluate retrieval of `model` (a model object, or a run / model folder) on the manifest `data`.

    With `rerank` K > 0 the top K candidates of every query are re-ordered by ITM (see the module docstring);
    the ITC-only figures are kept under "itc_only". Writes `results.json` into `out` when given and returns the
    results.
    """
    if rerank < 0:
        raise ValueError(f"rerank must be >= 0 (0 = ITC only), got {rerank}")
    from medunifier.data.findings import COMPETITION_FINDINGS

    ckpt, model = eval_model(model, device)
    classes = list(classes or COMPETITION_FINDINGS)
    records, root = load_split(data, split)
    records, y, dropped = classify_records(records, classes)
    if len(records) < 2:
        raise ValueError(f"{data}: {len(records)} usable records (an image and exactly one of {classes})")
    texts = [record_text(r) for r in records]
    if rerank:
        if not hasattr(model, "itm_logits"):
            raise ValueError(f"--rerank needs a model with an ITM head; {type(model).__name__} has none")
        with torch.no_grad():  # one pass through the vision tower serves ITC and ITM
            vision_tokens = [model.image_features(px) for px in image_batches(records, root, model, batch_size,
                                                                              num_workers)]
            image_emb = torch.cat([model.encode_image(None, image_embeds=v).float().cpu() for v in vision_tokens])
            vision_tokens = torch.cat([v.float().cpu() for v in vision_tokens])  # [N, T, D]
    else:
        image_emb = encode_images(model, records, root, batch_size, num_workers)  # [N, Q, E]
    text_emb = encode_texts(model, texts)  # [N, E]
    sim = chunked_similarity(model, image_emb, text_emb)  # [N, N]
    itc_only = retrieval_scores(sim.numpy(), y, ks)
    scores = itc_only
    if rerank:
        tokens = {name: t.cpu() for name, t in model.tokenize(texts).items()}
        i2t, t2i = itm_rerank(model, vision_tokens, tokens, sim, rerank)
        scores = retrieval_scores(i2t.numpy(), y, ks, sim_t2i=t2i.numpy())
    results: dict[str, Any] = {
        "task": "retrieval",
        "ckpt": ckpt,
        "data": str(data),
        "split": split,
        "n": len(records),
        "dropped": dropped,
        "classes": classes,
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "metric_note": "precision_at_k is PRIOR/CXR-CLIP 'mAP@K' (same-class hits in the top K / K); "
        "recall_at_k and ranks are for the exact image-report pair",
        "rerank": rerank,
        **scores,
    }
    if rerank:
        results["itc_only"] = itc_only
    if out is not None:
        write_results(results, out)
    print_retrieval_table(results, console)
    return results


def print_retrieval_table(results: dict[str, Any], console: Console | None = None) -> None:
    ks = list(results["image_to_text"]["precision_at_k"])
    columns = ["direction", *[f"mAP@{k}" for k in ks], *[f"R@{k}" for k in ks], "mean rank"]
    rows = []
    for direction in ("image_to_text", "text_to_image"):
        r = results[direction]
        rows.append([
            direction.replace("_", " "),
            *[fmt(r["precision_at_k"][k]) for k in ks],
            *[fmt(r["recall_at_k"][k]) for k in ks],
            f"{r['mean_rank']:.1f}",
        ])
    print_table(f"retrieval on {results['n']} pairs ({len(results['classes'])} classes), %", columns, rows, console)
