"""Overfit one fixed batch: the first sanity check of any model change.

Every objective should fall by a large factor and the reconstruction should become sharp when the
model sees the same few samples again and again; if one does not, that objective is broken.
Used by `tests/model/test_overfit.py` (a shrunk model) and `benchmarks/overfit_tiny.py` (the
`tiny` preset on 32 SynthCXR samples).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medunifier.config import MedUnifierConfig
from medunifier.data.dataset import Collator, ManifestDataset
from medunifier.data.manifest import load_records
from medunifier.model.medunifier import MedUnifier
from medunifier.train.optim import parameter_groups

OBJECTIVES = ("itc", "itm", "itg", "tig")


@dataclass
class OverfitResult:
    first: dict[str, float]
    last: dict[str, float]
    psnr_db: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def ratios(self) -> dict[str, float]:
        """last / first for every objective (0.5 means the loss halved)."""
        return {k: self.last[k] / self.first[k] for k in self.first if k in OBJECTIVES}


def fixed_batch(config: MedUnifierConfig, manifest: str | Path, n: int, tokenizer) -> dict:
    records = [r for r in load_records(manifest, splits=["train"]) if r.image][:n]
    if len(records) < n:
        raise ValueError(f"{manifest} has only {len(records)} training images, {n} asked")
    c = config.image
    dataset = ManifestDataset(records, root=Path(manifest).parent, image_size=c.size, channels=c.channels,
                              mean=c.mean, std=c.std)
    return Collator(tokenizer, config.text.max_length)([dataset[i] for i in range(n)])


def overfit(config: MedUnifierConfig, manifest: str | Path, n: int = 32, steps: int = 300, lr: float = 1e-3,
            seed: int = 0, window: int = 10, decay: bool = False) -> OverfitResult:
    """Train on one batch of `n` samples for `steps` AdamW steps; compare the first and last `window` steps.

    Args:
        decay: cosine-decay the learning rate to zero over the run. At a constant rate the last steps
            still move by whole decibels from step to step (the codebooks and TIG jump), so a check on the
            final state is a check on one noisy sample; decayed, the run ends settled.
    """
    torch.manual_seed(seed)
    model = MedUnifier(config)
    batch = fixed_batch(config, manifest, n, model.tokenizer)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.0), lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))) if decay else (lambda step: 1.0))
    model.train()
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for _ in range(steps):
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        row = {k: float(v.detach()) for k, v in out.losses.items()}
        row["psnr"] = float(out.metrics.get("psnr", float("nan")))
        history.append(row)
    seconds = time.perf_counter() - start

    def mean(rows: list[dict[str, float]]) -> dict[str, float]:
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

    model.eval()
    with torch.no_grad():
        recon = model.reconstruct(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    from medunifier.utils import psnr_normalised as psnr

    return OverfitResult(
        first=mean(history[:window]),
        last=mean(history[-window:]),
        psnr_db=float(psnr(recon, batch["pixel_values"], config.image.std)),
        seconds=seconds,
        history=history,
    )
