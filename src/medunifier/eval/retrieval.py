"""Image-text retrieval on a 5x200-style set (paper Table 2).

Every record gives one image and its report; the class of both is the record's one positive
competition finding. Image-to-text ranks all reports for each image (and text-to-image all images for
each report) by the model's ITC similarity (max over queries of the cosine). Scores: "mAP@K" as
PRIOR / CXR-CLIP define it (precision@K with same-class hits, averaged over queries), Recall@K of the
exact pair, and the mean / median rank of the exact pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from medunifier.eval.common import (
    chunked_similarity,
    classify_records,
    encode_images,
    encode_texts,
    fmt,
    load_split,
    print_table,
    record_text,
    write_results,
)
from medunifier.eval.metrics import mean_rank, median_rank, precision_at_k, recall_at_k
from medunifier.model import load_model
from medunifier.model.protocols import ImageTextModel


def retrieval_scores(sim, classes, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Both directions from one square image-by-text similarity [N, N] whose pairs lie on the diagonal."""
    out = {}
    for direction, matrix in (("image_to_text", sim), ("text_to_image", sim.T)):
        ks_ok = [k for k in ks if k <= matrix.shape[1]]
        out[direction] = {
            "precision_at_k": precision_at_k(matrix, classes, classes, ks_ok),
            "recall_at_k": recall_at_k(matrix, ks_ok),
            "mean_rank": mean_rank(matrix),
            "median_rank": median_rank(matrix),
        }
    return out


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
) -> dict[str, Any]:
    """Evaluate retrieval of `model` (a model object, or a run / model folder) on the manifest `data`.

    Writes `results.json` into `out` when given and returns the results.
    """
    from medunifier.data.findings import COMPETITION_FINDINGS

    ckpt = None
    if isinstance(model, (str, Path)):
        ckpt, model = str(model), load_model(model, device)
    if hasattr(model, "eval"):
        model.eval()
    classes = list(classes or COMPETITION_FINDINGS)
    records, root = load_split(data, split)
    records, y, dropped = classify_records(records, classes)
    if len(records) < 2:
        raise ValueError(f"{data}: {len(records)} usable records (an image and exactly one of {classes})")
    texts = [record_text(r) for r in records]
    image_emb = encode_images(model, records, root, batch_size, num_workers)  # [N, Q, E]
    text_emb = encode_texts(model, texts)  # [N, E]
    sim = chunked_similarity(model, image_emb, text_emb).numpy()  # [N, N]
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
        **retrieval_scores(sim, y, ks),
    }
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
