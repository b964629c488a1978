"""Zero-shot classification with GLoRIA-style prompt ensembles (paper Table 3).

A prompt file (`medunifier/configs/prompts/*.yaml`, shipped in the package) gives, per class, severity x subtype x location phrases whose
combinations fill a template. Each image is scored against every prompt of a class (ITC similarity,
max over queries), the prompt similarities are ensembled (mean or max), and the best class wins.
Scores: accuracy, macro-F1 and one-vs-rest AUROC.
"""

from __future__ import annotations

import itertools
import random
import re
import string
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from rich.console import Console

from medunifier.config import CONFIG_DIR, shipped_yaml
from medunifier.eval.common import (
    classify_records,
    encode_images,
    encode_texts,
    eval_model,
    fmt,
    load_split,
    print_table,
    write_results,
)
from medunifier.eval.metrics import classification_metrics, zero_shot_scores
from medunifier.model.protocols import ImageTextModel

PROMPT_DIR = CONFIG_DIR / "prompts"


def resolve_prompts_path(name_or_path: str | Path) -> Path:
    """A prompt file path, or the name of one shipped in medunifier/configs/prompts ('chexpert5', 'pneumonia')."""
    path = Path(name_or_path)
    if path.exists():
        return path
    return shipped_yaml(PROMPT_DIR, name_or_path, lambda shipped: FileNotFoundError(
        f"no prompt file '{name_or_path}' (shipped: {shipped})"))


def expand_prompts(spec: dict[str, Any], template: str, max_prompts: int | None, seed: int) -> list[str]:
    """Every combination of the template's fields (plus any literal `prompts`), deduplicated, then sampled."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    prompts: list[str] = list(spec.get("prompts", []))
    if fields and all(f in spec for f in fields):
        choices = [[str(w) for w in (spec[f] if isinstance(spec[f], list) else [spec[f]])] for f in fields]
        for combo in itertools.product(*choices):
            prompts.append(template.format(**dict(zip(fields, combo))))
    elif any(f in spec for f in fields):
        missing = [f for f in fields if f not in spec]
        raise ValueError(f"prompt spec misses template fields {missing}")
    cleaned = list(dict.fromkeys(re.sub(r"\s+", " ", p).strip() for p in prompts))
    cleaned = [p for p in cleaned if p]
    if max_prompts is not None and len(cleaned) > max_prompts:
        cleaned = random.Random(seed).sample(cleaned, max_prompts)
    return cleaned


def load_prompts(path: str | Path, seed: int | None = None, max_prompts: int | None = None) -> dict[str, list[str]]:
    """Class name -> prompts, expanded from a GLoRIA-style YAML file (see medunifier/configs/prompts/chexpert5.yaml).

    `seed` and `max_prompts` override the file's values; the same seed always gives the same prompts.
    """
    path = resolve_prompts_path(path)
    data = yaml.safe_load(path.read_text()) or {}
    classes = data.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise ValueError(f"{path}: needs a non-empty 'classes' mapping")
    template = data.get("template", "{severity} {subtype} {location}")
    max_prompts = max_prompts if max_prompts is not None else data.get("max_prompts")
    seed = seed if seed is not None else int(data.get("seed", 0))
    out = {}
    for name, spec in classes.items():
        if isinstance(spec, list):
            spec = {"prompts": spec}
        prompts = expand_prompts(spec, spec.get("template", template), max_prompts, seed)
        if not prompts:
            raise ValueError(f"{path}: class '{name}' has no prompts")
        out[str(name)] = prompts
    return out


def run_zeroshot(
    model: ImageTextModel,
    data: str | Path,
    prompts: str | Path | dict[str, list[str]] = "chexpert5",
    out: str | Path | None = None,
    ensemble: Literal["mean", "max", "embedding"] = "mean",
    seed: int | None = None,
    max_prompts: int | None = None,
    split: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Zero-shot classification of the manifest's images into the prompt file's classes.

    Records whose labels do not single out exactly one class are left out (and counted).
    """
    ckpt, model = eval_model(model, device)
    prompt_sets = prompts if isinstance(prompts, dict) else load_prompts(prompts, seed, max_prompts)
    classes = list(prompt_sets)
    records, root = load_split(data, split)
    records, y, dropped = classify_records(records, classes)
    if not records:
        raise ValueError(f"{data}: no record has an image and exactly one of the classes {classes}")
    image_emb = encode_images(model, records, root, batch_size, num_workers)  # [N, Q, E]
    prompt_embs = [encode_texts(model, prompt_sets[c]) for c in classes]  # C x [P_c, E]
    scores = zero_shot_scores(image_emb, prompt_embs, ensemble=ensemble).numpy()  # [N, C]
    metrics = classification_metrics(y, scores, classes)
    results: dict[str, Any] = {
        "task": "zeroshot",
        "ckpt": ckpt,
        "data": str(data),
        "split": split,
        "prompts": prompts if not isinstance(prompts, dict) else "<given>",
        "ensemble": ensemble,
        "num_prompts": {c: len(prompt_sets[c]) for c in classes},
        "n": len(records),
        "dropped": dropped,
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        **metrics,
    }
    if out is not None:
        write_results(results, out)
        write_results({"prompts": prompt_sets}, out, "prompts.json")
    print_zeroshot_table(results, console)
    return results


def print_zeroshot_table(results: dict[str, Any], console: Console | None = None) -> None:
    classes = results["classes"]
    cm = np.asarray(results["confusion_matrix"])
    rows = []
    for i, c in enumerate(classes):
        support = int(cm[i].sum())
        recall = cm[i, i] / support if support else None
        rows.append([c, str(support), str(results["num_prompts"][c]), fmt(recall), fmt(results["auroc_per_class"][c])])
    rows.append(["all", str(results["n"]), "", "", fmt(results["auroc"])])
    print_table(f"zero-shot ({results['ensemble']} ensemble), %",
                ["class", "n", "prompts", "recall", "AUROC"], rows, console)
    (console or Console()).print(f"accuracy {fmt(results['accuracy'])}  macro-F1 {fmt(results['macro_f1'])}  "
                                 f"AUROC {fmt(results['auroc'])}")
