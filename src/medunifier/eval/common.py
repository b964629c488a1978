"""Shared plumbing of the evaluators: loading a model and a manifest, classes, batched encoding, results.

Any object with the MedUnifier inference API works as a model here (`tokenize`, `encode_image`,
`encode_text`, `similarity`, `image_features`, `query_states`, `generate_report`, `config.image`), so
the evaluators can be tested with small fakes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from medunifier.data.images import load_image, to_tensor
from medunifier.data.manifest import Record, get_image_root, load_records
from medunifier.model import load_model
from medunifier.model.protocols import ImageTextModel
from medunifier.utils import jsonable

NEGATIVE_CLASS_NAMES = ("normal", "no_finding", "none", "negative")


def model_device(model: ImageTextModel) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device(getattr(model, "device", "cpu"))


def eval_model(model: ImageTextModel | str | Path, device: str | None = None) -> tuple[str | None, ImageTextModel]:
    """(the folder it was loaded from or None, the model in eval mode) of an evaluator's `model` argument.

    Args:
        model: a model object, or a run / saved model folder to load.
        device: where a loaded model goes (default: cuda when available).
    """
    ckpt = None
    if isinstance(model, (str, Path)):
        ckpt, model = str(model), load_model(model, device)
    if hasattr(model, "eval"):
        model.eval()
    return ckpt, model


# ------------------------------------------------------------------------------------------ records


def load_split(path: str | Path, split: str | None = None) -> tuple[list[Record], Path]:
    """Records of a manifest (and its folder, the root of relative image paths).

    With `split`: a manifest holding several splits keeps only that one (an error if it has none of it);
    a manifest holding one split is used whole, so a dedicated test manifest needs no split field.
    Edit records (counterfactual pairs) are left out: their image is the source and their text the
    target's report; `medunifier eval edit` reads them.
    """
    path = Path(path)
    records = [r for r in load_records(path) if r.task != "edit"]
    if split is not None:
        splits = {r.split for r in records}
        if len(splits) > 1:
            if split not in splits:
                raise ValueError(f"{path} holds splits {sorted(splits)} but no '{split}' records")
            records = [r for r in records if r.split == split]
    return records, path.parent


def assign_class(labels: dict[str, int], classes: Sequence[str]) -> int | None:
    """Index of the one class a record belongs to, or None when it is ambiguous.

    A class is matched by a positive label of the same name (label 1). A class named like 'normal' or
    'no_finding' also matches a record with no positive among the other classes.
    """
    positives = [i for i, c in enumerate(classes) if labels.get(c) == 1]
    if len(positives) == 1:
        return positives[0]
    if not positives:
        negatives = [i for i, c in enumerate(classes) if c in NEGATIVE_CLASS_NAMES]
        if len(negatives) == 1:
            return negatives[0]
    return None


def classify_records(records: Sequence[Record], classes: Sequence[str]) -> tuple[list[Record], np.ndarray, int]:
    """Keep records with an image and exactly one class; returns (records, class indices [N], dropped)."""
    kept, ys = [], []
    for r in records:
        y = assign_class(r.labels, classes) if r.image is not None else None
        if y is not None:
            kept.append(r)
            ys.append(y)
    return kept, np.asarray(ys, dtype=np.int64), len(records) - len(kept)


def infer_classes(records: Sequence[Record]) -> list[str]:
    """The single-label class set a labelled manifest implies (pass classes explicitly to override).

    1. Every record has exactly one positive competition finding (a 5x200-style set): those findings.
    2. Every record has exactly one positive label: the labels seen (e.g. no_finding / pneumonia).
    3. A single label is ever positive: ['normal', that label] (e.g. RSNA's pneumonia).
    Anything else is multi-label, which these single-label evaluators do not infer.
    """
    from medunifier.data.findings import COMPETITION_FINDINGS, FINDINGS

    def ordered(names: set[str]) -> list[str]:
        return sorted(names, key=lambda k: (FINDINGS.index(k) if k in FINDINGS else len(FINDINGS), k))

    if not records:
        raise ValueError("no records: cannot infer classes")
    positives = [{k for k, v in r.labels.items() if v == 1} for r in records]
    competition = [p & set(COMPETITION_FINDINGS) for p in positives]
    if all(len(p) == 1 for p in competition):
        return ordered(set().union(*competition))
    seen = set().union(*positives)
    if all(len(p) == 1 for p in positives) and len(seen) > 1:
        return ordered(seen)
    if len(seen) == 1:
        return ["normal", *seen]
    raise ValueError(f"cannot infer single-label classes from the labels {ordered(seen)} (pass the classes)")


def record_text(record: Record) -> str:
    """The report of a record: `text`, else findings + impression."""
    if record.text.strip():
        return record.text
    parts = [p for p in (record.findings, record.impression) if p]
    return " ".join(parts)


# ------------------------------------------------------------------------------------------- images


class ImageRecords(Dataset):
    """Pixel tensors of manifest records, preprocessed as the model expects: (pixel_values [C, S, S], index)."""

    def __init__(self, records: Sequence[Record], root: str | Path, image_config: Any):
        self.records = list(records)
        self.root = Path(root)
        self.image_root = get_image_root()  # fixed here for DataLoader workers
        self.cfg = image_config

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        rec = self.records[index]
        arr = load_image(rec.image_path(self.root, self.image_root))
        c = self.cfg
        return to_tensor(arr, c.size, channels=c.channels, mean=c.mean, std=c.std), index


def image_batches(
    records: Sequence[Record], root: str | Path, model: ImageTextModel, batch_size: int = 64, num_workers: int = 0
) -> Iterator[Tensor]:
    """Batches of pixel values [B, C, S, S] on the model's device, in record order."""
    loader = DataLoader(
        ImageRecords(records, root, model.config.image), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    device = model_device(model)
    for pixels, _ in loader:
        yield pixels.to(device)


@torch.no_grad()
def encode_images(model: ImageTextModel, records: Sequence[Record], root: str | Path, batch_size: int = 64,
                  num_workers: int = 0) -> Tensor:
    """Normalised per-query image embeddings of every record, on the CPU: [N, Q, E]."""
    out = [model.encode_image(px).float().cpu() for px in image_batches(records, root, model, batch_size, num_workers)]
    return torch.cat(out, dim=0)


@torch.no_grad()
def encode_texts(model: ImageTextModel, texts: Sequence[str], batch_size: int = 256) -> Tensor:
    """Normalised text embeddings, on the CPU: [N, E]."""
    out = []
    for start in range(0, len(texts), batch_size):
        tok = model.tokenize(list(texts[start : start + batch_size]))
        out.append(model.encode_text(tok["input_ids"], tok["attention_mask"]).float().cpu())
    return torch.cat(out, dim=0)


@torch.no_grad()
def chunked_similarity(model: ImageTextModel, image_emb: Tensor, text_emb: Tensor, chunk: int = 256) -> Tensor:
    """model.similarity over image chunks (bounds memory of the [Bi, Bt, Q] intermediate): [Ni, Nt]."""
    rows = [model.similarity(image_emb[i : i + chunk], text_emb) for i in range(0, image_emb.shape[0], chunk)]
    return torch.cat(rows, dim=0).float()


# ------------------------------------------------------------------------------------------ results


def write_results(results: dict[str, Any], out: str | Path, name: str = "results.json") -> Path:
    """Write `results` as JSON into the folder `out` atomically; returns the file path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_name(f".{name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(jsonable(results), indent=2))
    tmp.replace(path)
    return path


def fmt(value: float | None, scale: float = 100.0, digits: int = 1) -> str:
    """A share for a table, in percent by default: '-' for None."""
    return "-" if value is None else f"{value * scale:.{digits}f}"


def figure(value: Any, digits: int = 3) -> str:
    """A figure for a table: '-' for None, a whole number (int, bool) as it is, any other real number to
    `digits` decimals, anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return f"{value:.{digits}f}"
    return str(value)


def finish_run(results: dict[str, Any], ckpt: str | Path, out: str | Path | None,
               print_tables: Callable[[dict[str, Any], Console | None], None], console: Console) -> dict[str, Any]:
    """The edge of an evaluator run on a run folder: note the checkpoint in `results`, write results.json into
    `out` (when given) and print the tables.

    Args:
        results: what the evaluation computed; gains "ckpt".
        ckpt: the run folder evaluated.
        out: the output folder, or None to write nothing.
        print_tables: the evaluator's table printer.
        console: where the tables go.
    Returns `results`.
    """
    results["ckpt"] = str(ckpt)
    if out is not None:
        write_results(results, out)
    print_tables(results, console)
    return results


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], console: Console | None = None) -> None:
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)
