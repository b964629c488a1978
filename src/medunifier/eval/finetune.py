"""Fine-tuned classification with 1%, 10% and 100% of the training labels (paper Table 1).

Two modes on the model's image representation f_q (the query outputs of the image-only pass):

- linear: frozen model; features = mean over queries of f_q [N, H]; a logistic-regression probe whose
  inverse regularisation C is picked on the validation set.
- full: vision encoder + query pass + a linear head trained end to end with AdamW for a few epochs;
  the epoch with the best validation score is tested.

For each label fraction and seed the training set is subsampled per class (stratified, at least one
image per class). `from_scratch` builds the same architecture with random weights and trains it with
the same budget: the baseline that shows what pre-training brings. Binary tasks report AUROC (and
accuracy), multi-class tasks accuracy (and macro AUROC); mean and std over seeds per fraction.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medunifier.eval.common import (
    ImageRecords,
    classify_records,
    eval_model,
    image_batches,
    infer_classes,
    load_split,
    model_device,
    print_table,
    write_results,
)
from medunifier.eval.metrics import classification_metrics, format_mean_std, mean_std
from medunifier.model.protocols import ImageTextModel
from medunifier.train.optim import parameter_groups

PROBE_C_GRID = (0.01, 0.1, 1.0, 10.0)


def stratified_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction * n_c) (at least 1) random samples of every class c."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must lie in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = min(len(idx), max(1, round(fraction * len(idx))))
        chosen.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def primary_metric(num_classes: int) -> str:
    return "auroc" if num_classes == 2 else "accuracy"


def _score(metrics: dict[str, Any], name: str) -> float:
    value = metrics.get(name)
    return -np.inf if value is None else float(value)


def random_init_like(model: ImageTextModel, seed: int) -> ImageTextModel:
    """The same architecture with fresh random weights (no pretrained vision or text checkpoint)."""
    torch.manual_seed(seed)
    device = model_device(model)
    if type(model).__name__ == "MedUnifier":
        config = model.config.model_copy(deep=True)
        config.vision.pretrained = None
        config.encoder.pretrained = None
        fresh = type(model)(config, tokenizer=model.tokenizer, load_pretrained=False)
    else:  # any other nn.Module: re-run every submodule's own initialiser
        fresh = copy.deepcopy(model)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return fresh.to(device).eval()


# --------------------------------------------------------------------------------------- linear probe


@torch.no_grad()
def extract_features(model: ImageTextModel, records, root, batch_size: int = 64, num_workers: int = 0) -> np.ndarray:
    """Mean over queries of the query outputs f_q: [N, H] float32."""
    feats = []
    for px in image_batches(records, root, model, batch_size, num_workers):
        f_q = model.query_states(model.image_features(px))  # [B, Q, H]
        feats.append(f_q.float().mean(dim=1).cpu().numpy())
    return np.concatenate(feats, axis=0)


def fit_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_classes: int, seed: int
) -> tuple[Any, float]:
    """Standardised logistic regression; C chosen on the validation set by the primary metric."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    best, best_score, best_c = None, -np.inf, None
    for c in PROBE_C_GRID:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
        probe.fit(x_train, y_train)
        score = _score(classification_metrics(y_val, _probe_scores(probe, x_val, num_classes)), primary_metric(num_classes))
        if score > best_score or best is None:
            best, best_score, best_c = probe, score, c
    return best, best_c


def _probe_scores(probe: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Class log-probabilities [N, C], with columns for classes missing from the training subset at -inf."""
    out = np.full((x.shape[0], num_classes), -1e9)
    out[:, probe.classes_] = probe.predict_log_proba(x)
    return out


# ------------------------------------------------------------------------------------ full fine-tuning


class ImageClassifier(nn.Module):
    """Vision encoder -> query pass -> mean over queries -> linear head: [B, C, S, S] -> logits [B, K]."""

    def __init__(self, backbone: Any, hidden_size: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, pixel_values: Tensor) -> Tensor:
        f_q = self.backbone.query_states(self.backbone.image_features(pixel_values))  # [B, Q, H]
        return self.head(f_q.mean(dim=1))


def _unfreeze(backbone: Any) -> None:
    """Full fine-tuning trains the vision encoder too, whatever the pre-training config said."""
    vision = getattr(backbone, "vision", None)
    if vision is not None and hasattr(vision, "frozen"):
        vision.frozen = False
        if getattr(vision, "feature_cache", None) is not None:
            vision.feature_cache = None
    if isinstance(backbone, nn.Module):
        backbone.requires_grad_(True)


@torch.no_grad()
def _predict(classifier: ImageClassifier, loader: DataLoader, device: torch.device) -> np.ndarray:
    classifier.eval()
    out = [classifier(px.to(device)).float().cpu() for px, _ in loader]
    return torch.cat(out).numpy()


def train_full(
    backbone: Any,
    train_ds: ImageRecords,
    y_train: np.ndarray,
    val_loader: DataLoader,
    y_val: np.ndarray,
    num_classes: int,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float = 0.05,
    num_workers: int = 0,
) -> tuple[ImageClassifier, dict[str, Any]]:
    """AdamW over the backbone's image path and a new head; returns the best-on-validation classifier."""
    torch.manual_seed(seed)
    device = model_device(backbone)
    _unfreeze(backbone)
    hidden = int(backbone.config.encoder.hidden_size)
    classifier = ImageClassifier(backbone, hidden, num_classes).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(classifier, weight_decay), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers)
    targets = torch.as_tensor(y_train, dtype=torch.long)
    metric = primary_metric(num_classes)
    best_state, best_score, history = None, -np.inf, []
    for epoch in range(epochs):
        classifier.train()
        losses = []
        for px, idx in loader:
            logits = classifier(px.to(device))  # [B, K]
            loss = F.cross_entropy(logits.float(), targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        val = classification_metrics(y_val, _predict(classifier, val_loader, device))
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), f"val_{metric}": val[metric]})
        if _score(val, metric) > best_score or best_state is None:
            best_score = _score(val, metric)
            best_state = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
    classifier.load_state_dict(best_state)
    return classifier, {"history": history, "best_val": best_score}


# ------------------------------------------------------------------------------------------- runner


def run_finetune(
    model: ImageTextModel,
    train: str | Path,
    val: str | Path | None,
    test: str | Path,
    out: str | Path | None = None,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seeds: int | Sequence[int] = 3,
    mode: Literal["linear", "full"] = "linear",
    from_scratch: bool = False,
    classes: Sequence[str] | None = None,
    epochs: int = 5,
    lr: float = 1e-4,
    batch_size: int = 32,
    weight_decay: float = 0.05,
    num_workers: int = 0,
    device: str | None = None,
    console: Console | None = None,
    holdout: float = 0.1,
    progress: bool = True,
) -> dict[str, Any]:
    """Classification heads on the model's image representation at several label fractions and seeds.

    `train`, `val`, `test` are manifests (the same file is fine: a manifest holding several splits is
    filtered to the one asked for). `seeds` is a count (0..n-1) or a list of seeds. Without `val` (a
    dataset whose evaluation split is its only held-out one, e.g. PneumoniaMNIST's val used as the test),
    a stratified `holdout` share of the training records, the same for every seed, does the model
    selection (probe C, best epoch) and the label fractions are drawn from the rest.
    """
    if mode not in ("linear", "full"):
        raise ValueError(f"mode must be 'linear' or 'full', got {mode!r}")
    ckpt, model = eval_model(model, device)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if val is None and not 0 < holdout < 1:
        raise ValueError(f"holdout must lie in (0, 1) when no validation manifest is given, got {holdout}")
    named = (("train", train), ("val", val), ("test", test))
    splits = {name: load_split(path, name) for name, path in named if path is not None}
    classes = list(classes or infer_classes(splits["train"][0]))
    data = {}
    for name, (records, root) in splits.items():
        recs, y, dropped = classify_records(records, classes)
        if len(recs) == 0:
            raise ValueError(f"{name} manifest: no record has an image and exactly one of {classes}")
        data[name] = {"records": recs, "root": root, "y": y, "dropped": dropped}
    if val is None:
        pool = data["train"]
        held = stratified_subset(pool["y"], holdout, seed=0)
        kept = np.setdiff1d(np.arange(len(pool["y"])), held)
        for name, rows in (("val", held), ("train", kept)):
            data[name] = {"records": [pool["records"][i] for i in rows], "root": pool["root"], "y": pool["y"][rows],
                          "dropped": pool["dropped"] if name == "train" else 0}
    num_classes = len(classes)
    metric = primary_metric(num_classes)

    runs: list[dict[str, Any]] = []
    features: dict[str, np.ndarray] | None = None
    if mode == "linear" and not from_scratch:  # one frozen model: extract features once
        features = {n: extract_features(model, d["records"], d["root"], batch_size, num_workers) for n, d in data.items()}
    bar = tqdm(total=len(seed_list) * len(fractions), desc=f"finetune {mode}{' scratch' if from_scratch else ''}",
               unit="run", disable=not progress)
    for seed in seed_list:
        seed_features = features
        if mode == "linear" and from_scratch:  # a random frozen model per seed
            random_model = random_init_like(model, seed)
            seed_features = {
                n: extract_features(random_model, d["records"], d["root"], batch_size, num_workers)
                for n, d in data.items()
            }
            del random_model
        for fraction in fractions:
            subset = stratified_subset(data["train"]["y"], fraction, seed)
            y_sub = data["train"]["y"][subset]
            if mode == "linear":
                probe, c = fit_probe(
                    seed_features["train"][subset], y_sub, seed_features["val"], data["val"]["y"], num_classes, seed
                )
                scores = _probe_scores(probe, seed_features["test"], num_classes)
                extra: dict[str, Any] = {"C": c}
            else:
                backbone = random_init_like(model, seed) if from_scratch else copy.deepcopy(model)
                train_ds = ImageRecords([data["train"]["records"][i] for i in subset], data["train"]["root"],
                                        model.config.image)
                val_loader = DataLoader(ImageRecords(data["val"]["records"], data["val"]["root"], model.config.image),
                                        batch_size=batch_size, num_workers=num_workers)
                test_loader = DataLoader(ImageRecords(data["test"]["records"], data["test"]["root"],
                                                      model.config.image), batch_size=batch_size,
                                         num_workers=num_workers)
                classifier, extra = train_full(backbone, train_ds, y_sub, val_loader, data["val"]["y"], num_classes,
                                               seed, epochs, lr, batch_size, weight_decay, num_workers)
                scores = _predict(classifier, test_loader, model_device(classifier))
                del classifier, backbone
            test_metrics = classification_metrics(data["test"]["y"], scores, classes)
            runs.append({"seed": seed, "fraction": float(fraction), "n_train": len(subset),
                         "accuracy": test_metrics["accuracy"], "auroc": test_metrics["auroc"],
                         "macro_f1": test_metrics["macro_f1"], **extra})
            bar.set_postfix(seed=seed, fraction=fraction, **{metric: round(float(test_metrics[metric]), 4)})
            bar.update(1)
    bar.close()

    per_fraction = {}
    for fraction in fractions:
        rows = [r for r in runs if r["fraction"] == float(fraction)]
        per_fraction[str(fraction)] = {
            "n_train": [r["n_train"] for r in rows],
            **{m: mean_std(r[m] for r in rows) for m in ("auroc", "accuracy", "macro_f1")},
        }
    results: dict[str, Any] = {
        "task": "finetune",
        "ckpt": ckpt,
        "mode": mode,
        "from_scratch": from_scratch,
        "classes": classes,
        "primary_metric": metric,
        "seeds": seed_list,
        "fractions": [float(f) for f in fractions],
        "budget": {"epochs": epochs, "lr": lr, "batch_size": batch_size} if mode == "full" else {"probe_C_grid": list(PROBE_C_GRID)},
        "data": {n: {"path": str(p) if p is not None else f"stratified {holdout:g} of train", "n": len(data[n]["y"]), "dropped": data[n]["dropped"],
                     "class_counts": {c: int((data[n]["y"] == i).sum()) for i, c in enumerate(classes)}}
                 for n, p in (("train", train), ("val", val), ("test", test))},
        "per_fraction": per_fraction,
        "runs": runs,
    }
    if out is not None:
        write_results(results, out)
    print_finetune_table(results, console)
    return results


def print_finetune_table(results: dict[str, Any], console: Console | None = None) -> None:
    metric = results["primary_metric"]
    other = "accuracy" if metric == "auroc" else "auroc"
    rows = []
    for fraction, row in results["per_fraction"].items():
        rows.append([f"{float(fraction) * 100:g}%", str(round(float(np.mean(row["n_train"])))),
                     format_mean_std(row[metric]), format_mean_std(row[other])])
    kind = f"{results['mode']}{' from scratch' if results['from_scratch'] else ''}"
    title = f"fine-tuning ({kind}, {len(results['seeds'])} seeds, {len(results['classes'])} classes), %"
    print_table(title, ["labels", "n train", metric, other], rows, console)
