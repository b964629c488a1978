"""Optimiser and learning-rate schedule of a run (paper: AdamW (0.9, 0.95), wd 0.05, 5% warm-up, cosine).

`WarmupCosineSchedule` is a small stateful scheduler: the learning rate of optimiser step `s`
(0-based) is a pure function of `s`, so a resumed run sees exactly the rates of an uninterrupted
one. Linear warm-up from `warmup_start_lr` to `peak_lr` over `warmup_steps`, then a half cosine
from `peak_lr` down to `min_lr` at `total_steps`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    lr_scale: dict[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, weight decay by tensor rank (`parameter_groups`).

    `lr_scale` maps parameter-name prefixes (whole module paths, e.g. "generator" or "generator.decoder")
    to learning-rate multipliers (the longest matching prefix wins); each group carries its `lr_scale`, which `WarmupCosineSchedule` applies at every step.
    """
    groups = [g for g in parameter_groups(model, weight_decay) if len(g["params"]) > 0]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if lr_scale:
        groups = split_groups_by_lr_scale(model, groups, lr_scale)
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def split_groups_by_lr_scale(
    model: nn.Module, groups: list[dict[str, Any]], lr_scale: dict[str, float]
) -> list[dict[str, Any]]:
    """Split each parameter group by the learning-rate multiplier of its parameters' names.

    A prefix that matches no trainable parameter is an error (a typo would otherwise train at the base rate).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    prefixes = sorted(lr_scale, key=len, reverse=True)

    def names_under(name: str, prefix: str) -> bool:  # "fc" is fc.weight's prefix, not fc2.weight's
        return name == prefix or name.startswith(prefix.rstrip(".") + ".")

    used: set[str] = set()
    split: list[dict[str, Any]] = []
    for group in groups:
        by_scale: dict[float, list[nn.Parameter]] = {}
        for param in group["params"]:
            name = names.get(id(param), "")
            prefix = next((p for p in prefixes if names_under(name, p)), None)
            if prefix is not None:
                used.add(prefix)
            by_scale.setdefault(1.0 if prefix is None else float(lr_scale[prefix]), []).append(param)
        for scale, params in sorted(by_scale.items()):
            split.append({**group, "params": params, "lr_scale": scale})
    unknown = sorted(set(lr_scale) - used)
    if unknown:
        raise ValueError(f"train.lr_scale: no trainable parameter is named with the prefix(es) {unknown}")
    return split


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups by tensor rank, as nanoGPT's `configure_optimizers` and BLIP-2 choose them.

    Every trainable tensor of rank >= 2 decays: linear and convolution kernels, embeddings, query tokens.
    Rank 0 and 1 do not: biases, norm gains and shifts, and scalars such as the ITC temperature. The rank
    decides, not the name, so a layer named unusually (transformers' ResNet stem is
    `embedder.embedder.convolution`) is grouped like any other.

    Args:
        model: the module whose parameters with `requires_grad` are grouped (frozen ones are left out).
        weight_decay: the decay of the first group.

    Returns:
        [{"params": rank >= 2, "weight_decay": weight_decay}, {"params": rank < 2, "weight_decay": 0.0}].
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def warmup_cosine_lr(
    step: int, peak_lr: float, total_steps: int, warmup_steps: int, warmup_start_lr: float, min_lr: float
) -> float:
    """Learning rate of optimiser step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets every param group's `lr` from the step count; `state_dict` is a JSON-able dict."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        peak_lr: float,
        total_steps: int,
        warmup_ratio: float = 0.05,
        warmup_start_lr: float = 0.0,
        min_lr: float = 0.0,
    ):
        self.optimizer = optimizer
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = round(warmup_ratio * total_steps)
        self.warmup_start_lr = float(min(warmup_start_lr, peak_lr))
        self.min_lr = float(min(min_lr, peak_lr))
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(
            step, self.peak_lr, self.total_steps, self.warmup_steps, self.warmup_start_lr, self.min_lr
        )

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def set_step(self, step: int) -> None:
        self.step_count = int(step)
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_start_lr": self.warmup_start_lr,
            "min_lr": self.min_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.peak_lr = float(state["peak_lr"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self.warmup_start_lr = float(state["warmup_start_lr"])
        self.min_lr = float(state["min_lr"])
        self._apply()
