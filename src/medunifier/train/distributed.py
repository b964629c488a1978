"""How a run spreads over processes: one process, or DDP over several (`torchrun` or `accelerate launch`).

The model all-gathers its contrastive features itself; our samplers split the data by rank. Each process
holds the whole model and optimiser, which is what checkpoints save and what exact resume restores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from medunifier.utils import launch_rank_world

__all__ = ["cpu_only_multiprocess", "weights_checksum", "write_rank_summary"]


def cpu_only_multiprocess() -> bool:
    """Several processes (torchrun) on a machine without accelerators.

    Accelerate only sets up its CPU multi-process mode (gloo) when told `cpu=True`; without it each
    torchrun process would silently train alone.
    """
    if launch_rank_world()[1] <= 1:
        return False
    from accelerate import utils

    probes = ("is_xpu_available", "is_npu_available", "is_mlu_available", "is_musa_available", "is_hpu_available")
    return not (torch.cuda.is_available() or any(getattr(utils, p, lambda: False)() for p in probes))


def weights_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in name order (compares processes and runs).

    BatchNorm running statistics are left out: each process updates them from its own batches (as in
    DDP without SyncBatchNorm, which has no CPU implementation), and the saved model carries rank 0's.
    """
    running = {f"{prefix}.{buffer}" if prefix else buffer
               for prefix, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
               for buffer in ("running_mean", "running_var", "num_batches_tracked")}
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in running:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_rank_summary(run_dir: Path, rank: int, world: int, step: int, model: nn.Module, *, dropped_samples: int,
                       first_ids: list[str]) -> Path:
    """Write `RUN/ranks/rank-R.json`: what one process of a multi-process run ended with, to compare processes.

    Args:
        run_dir: the run folder.
        rank: this process's index.
        world: the number of processes.
        step: the step the run ended at.
        model: the unwrapped model (its `weights_checksum` must agree across processes).
        dropped_samples: samples this process dropped (unreadable images).
        first_ids: the ids of the first samples this process trained on.
    """
    folder = run_dir / "ranks"
    folder.mkdir(exist_ok=True)
    summary = {"rank": rank, "world_size": world, "step": step, "weights_sha256": weights_checksum(model),
               "dropped_samples": dropped_samples, "first_sample_ids": first_ids}
    path = folder / f"rank-{rank}.json"
    path.write_text(json.dumps(summary, indent=1))
    return path
