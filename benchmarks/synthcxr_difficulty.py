"""How hard is SynthCXR? A small supervised CNN, trained for ~2 minutes, scored by per-finding AUROC.

Generates SynthCXR in memory at 64x64 (10,000 images: 8,000 train, 1,000 test by the manifest
split), trains a plain 5-layer CNN with a multi-label BCE loss for a fixed wall-clock budget and
prints the test AUROC of each finding as a markdown table, plus the top-1 accuracy on the 5x200
set (argmax over the five competition findings). The target is "high but not perfect" (roughly
0.75-0.97): near 1.0 everywhere means the findings are too easy, near 0.5 that they are invisible.

    python benchmarks/synthcxr_difficulty.py [--minutes 2] [--n 10000] [--size 64]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medunifier.data.findings import COMPETITION_FINDINGS, FINDINGS
from medunifier.data.synthcxr import EVAL_STREAM, synthesize


class SmallCNN(nn.Module):
    """Five conv blocks (conv-BN-ReLU-maxpool), global average pooling, one logit per finding."""

    def __init__(self, num_outputs: int, width: int = 16):
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 4 * width, 8 * width]
        blocks = []
        for c_in, c_out in itertools.pairwise(chans):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(chans[-1], num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, S, S) -> (B, num_outputs)
        return self.head(self.features(x).mean(dim=(2, 3)))


def _tensors(images: np.ndarray, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(images).float().div_(255.0).sub_(0.5).div_(0.5).unsqueeze(1)  # (N, 1, S, S)
    y = torch.tensor([[r["labels"][name] for name in FINDINGS] for r in records], dtype=torch.float32)
    return x, y


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    model.eval()
    return torch.cat([torch.sigmoid(model(x[i:i + batch])) for i in range(0, len(x), batch)]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0,
                        help="training budget: wall-clock minutes on an idle machine (counted as CPU time)")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)

    start = time.perf_counter()
    images, records = synthesize(args.n, size=args.size, seed=args.seed, workers=args.workers)
    eval_images, eval_records = synthesize(1000, size=args.size, seed=args.seed, workers=args.workers,
                                           stream=EVAL_STREAM, per_class=200)
    print(f"generated {len(records) + len(eval_records)} images of {args.size}x{args.size} "
          f"in {time.perf_counter() - start:.1f} s")
    x, y = _tensors(images, records)
    split = np.array([r["split"] for r in records])
    train_idx = torch.from_numpy(np.flatnonzero(split == "train"))
    test_idx = torch.from_numpy(np.flatnonzero(split == "test"))
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]

    model = SmallCNN(len(FINDINGS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    # the budget is CPU time (minutes x threads), so a busy shared machine trains as much as an idle one
    threads = torch.get_num_threads()
    budget, batch, steps = args.minutes * 60.0 * threads, 128, 0
    start, cpu_start = time.perf_counter(), time.process_time()

    def spent() -> bool:
        return time.process_time() - cpu_start >= budget or time.perf_counter() - start >= 5 * budget

    while not spent():
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if spent():
                break
    train_seconds = time.perf_counter() - start
    print(f"trained {steps} steps (~{steps * batch / len(x_train):.1f} epochs) of batch {batch} on {len(x_train)} "
          f"images: {train_seconds:.0f} s wall, {time.process_time() - cpu_start:.0f} s CPU on {threads} threads; "
          f"last loss {loss.item():.3f}")

    probs = _predict(model, x_test)
    print(f"\n| finding | test positives / {len(x_test)} | AUROC |\n|---|---|---|")
    aurocs = []
    for j, name in enumerate(FINDINGS):
        positives = int(y_test[:, j].sum())
        if 0 < positives < len(y_test):
            auc = roc_auc_score(y_test[:, j].numpy(), probs[:, j])
            aurocs.append(auc)
            print(f"| {name} | {positives} | {auc:.3f} |")
        else:
            print(f"| {name} | {positives} | n/a |")
    print(f"| **mean** | | **{np.mean(aurocs):.3f}** |")

    ex, _ = _tensors(eval_images, eval_records)
    competition = [FINDINGS.index(name) for name in COMPETITION_FINDINGS]
    pred = _predict(model, ex)[:, competition].argmax(1)
    truth = np.array([COMPETITION_FINDINGS.index(r["finding_details"][0]["name"]) for r in eval_records])
    print(f"\n5x200 top-1 accuracy over the five competition findings: {np.mean(pred == truth):.3f} (chance 0.2)")


if __name__ == "__main__":
    main()
