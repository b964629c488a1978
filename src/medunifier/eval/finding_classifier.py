"""The finding classifier of the synthesis evaluators: it labels images (real, reconstructed, generated or
edited) with one of the five CheXpert competition findings, and `consistency` scores its labels against the
finding each image was asked to show.

Kinds: `cnn` (a small CNN on pixels, independent of the model under test, one sigmoid per finding; see
`train_cnn_classifier`) or `probe` (the fine-tuning evaluator's linear probe on the model's own query
features; see `train_probe_classifier`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medunifier.model.protocols import ImageTextModel
from medunifier.utils import normalise

__all__ = [
    "MAX_CLASSIFIER_IMAGES", "FindingClassifier", "SmallCNN", "consistency", "to_input", "train_cnn_classifier",
    "train_probe_classifier",
]


MAX_CLASSIFIER_IMAGES = 20_000  # the cnn classifier trains on at most this many images (time and memory)


def to_input(images: np.ndarray) -> Tensor:
    """uint8 (N, S, S) -> float [N, 1, S, S] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)[:, None]


class SmallCNN(nn.Module):
    """Five conv-BN-ReLU-maxpool blocks, global average pooling, a linear head: [B, 1, S, S] -> [B, K]."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(chans):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))  # [B, 8 * width]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class FindingClassifier:
    """A trained 5-way finding classifier on uint8 (N, S, S) images: `predict_proba`, `features`."""

    def __init__(self, kind: str, classes: Sequence[str], net: SmallCNN | None = None, model: ImageTextModel | None = None,
                 probe: Any = None, info: dict[str, Any] | None = None):
        self.kind, self.classes = kind, list(classes)
        self.net, self.model, self.probe = net, model, probe
        self.info = info or {}

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = to_input(images[start : start + batch_size])
            if self.kind == "cnn":
                self.net.eval()
                out.append(self.net.features(x.to(_device(self.net))).float().cpu().numpy())
            else:
                c = self.model.config.image
                px = normalise((x + 1) / 2, c.mean, c.std)
                px = px.expand(-1, c.channels, -1, -1).to(_device(self.model))
                if px.shape[-1] != c.size:
                    px = F.interpolate(px, size=(c.size, c.size), mode="bilinear", align_corners=False)
                f_q = self.model.query_states(self.model.image_features(px))  # [B, Q, H]
                out.append(f_q.float().mean(1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        if self.kind == "cnn":  # per-finding sigmoid probabilities, renormalised over the K findings
            self.net.eval()
            x = to_input(images).to(_device(self.net))
            p = torch.cat([self.net(x[i : i + 256]).sigmoid().cpu() for i in range(0, len(x), 256)]).double()
            return (p / p.sum(1, keepdim=True).clamp(min=1e-12)).numpy()
        proba = np.zeros((len(images), len(self.classes)))
        proba[:, self.probe.classes_] = self.probe.predict_proba(self.features(images))
        return proba

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_proba(images).argmax(1)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def train_cnn_classifier(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, classes: Sequence[str],
    epochs: int = 6, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, device: str | None = None,
) -> FindingClassifier:
    """Small CNN, one sigmoid output per finding, AdamW + one-cycle schedule, random shifts of up to 3 px.

    y_train: class indices [N] or multi-hot labels [N, K] (1 present, 0 absent, -1 unknown: not scored), so
    images with several findings or none also teach it. Predictions are the argmax over the K findings; the
    epoch with the best validation accuracy (y_val: class indices of single-finding images) is kept.
    """
    torch.manual_seed(seed)
    dev = torch.device(device or "cpu")
    net = SmallCNN(len(classes)).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, math.ceil(len(x_train) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    y = torch.as_tensor(y_train)
    if y.dim() == 1:
        y = F.one_hot(y.long(), len(classes))
    y = y.float()
    x = to_input(x_train)
    xv = to_input(x_val).to(dev)
    g = torch.Generator().manual_seed(seed)
    best, best_acc, history = None, -1.0, []
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            batch = _random_shift(x[idx], 3, g).to(dev)
            target = y[idx].to(dev)
            known = (target >= 0).float()
            loss = (F.binary_cross_entropy_with_logits(net(batch), target.clamp(min=0), reduction="none") * known
                    ).sum() / known.sum().clamp(min=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(xv).argmax(1).cpu().numpy() == y_val).mean())
        history.append(acc)
        if acc > best_acc:
            best_acc, best = acc, {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best)
    net.eval()
    return FindingClassifier("cnn", classes, net=net,
                             info={"val_accuracy": best_acc, "val_history": history, "epochs": epochs})


def _random_shift(x: Tensor, pixels: int, g: torch.Generator) -> Tensor:
    """Shift each image by up to `pixels` in x and y (edge padding), a cheap augmentation."""
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    size = x.shape[-1]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=g)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def train_probe_classifier(model: ImageTextModel, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                           y_val: np.ndarray, classes: Sequence[str], seed: int = 0) -> FindingClassifier:
    """The fine-tuning evaluator's linear probe (standardised logistic regression, C on val) on f_q means."""
    from medunifier.eval.finetune import fit_probe

    clf = FindingClassifier("probe", classes, model=model)
    probe, c = fit_probe(clf.features(x_train), y_train, clf.features(x_val), y_val, len(classes), seed)
    clf.probe = probe
    val_acc = float((clf.predict(x_val) == y_val).mean())
    clf.info = {"val_accuracy": val_acc, "C": c}
    return clf


def consistency(pred: np.ndarray, target: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy of predicted against requested findings: per finding, macro (mean over findings), overall."""
    per = {c: float((pred[target == i] == i).mean()) for i, c in enumerate(classes) if (target == i).any()}
    return {"macro": float(np.mean(list(per.values()))) if per else None, "per_finding": per,
            "accuracy": float((pred == target).mean()) if len(target) else None, "n": len(target)}

