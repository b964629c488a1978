"""How a run spreads over processes: one process, or DDP over several (`torchrun` or `accelerate launch`).

The model all-gathers its contrastive features itself; our samplers split the data by rank. Each process
holds the whole model and optimiser, which is what checkpoints save and what exact resume restores.
Sharded training (Accelerate's FSDP, DeepSpeed or Megatron-LM) would hold a shard per process, which neither
the checkpoints nor the model's own all-gather handle: such a launch is refused before anything is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medunifier.config import ConfigError
from medunifier.utils import launch_rank_world

__all__ = [
    "UNSUPPORTED_BACKENDS", "UnsupportedDistributionError", "check_accelerator", "check_launch",
    "cpu_only_multiprocess", "weights_checksum", "write_rank_summary",
]

# Accelerate's distributed types that shard the model or the optimiser -> (name, the variable that asks for it)
UNSUPPORTED_BACKENDS = {
    "FSDP": ("FSDP", "ACCELERATE_USE_FSDP"),
    "DEEPSPEED": ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"),
    "MEGATRON_LM": ("Megatron-LM", "ACCELERATE_USE_MEGATRON_LM"),
}
_TRUE = ("1", "true", "yes", "y", "on", "t")
WHAT_WORKS = ("medunifier trains on one process (CPU or GPU) or with DDP over several: "
              "`torchrun --nproc_per_node N -m medunifier.cli pretrain ...`, or `accelerate launch` with a "
              "multi-GPU (DDP) config")


class UnsupportedDistributionError(ConfigError):
    """A launch that asks for a distributed backend medunifier does not support (FSDP, DeepSpeed, Megatron-LM)."""


def _refusal(kind: str, why: str, fix: str) -> UnsupportedDistributionError:
    name = UNSUPPORTED_BACKENDS[kind][0]
    return UnsupportedDistributionError(f"{name} is not supported ({why}). {WHAT_WORKS}. {fix}")


def check_launch() -> None:
    """Refuse, before anything is built, a launch that asks Accelerate for FSDP, DeepSpeed or Megatron-LM:
    through the environment `accelerate launch` sets from its config, or through an Accelerate state that
    this process already set up.

    Raises:
        UnsupportedDistributionError: the message names the backend, how it was asked for, and what works.
    """
    for kind, (name, flag) in UNSUPPORTED_BACKENDS.items():
        value = os.environ.get(flag, "")
        if value.strip().lower() in _TRUE:
            raise _refusal(kind, f"the environment sets {flag}={value}, as `accelerate launch` does for a {name} "
                           "config", f"Unset {flag}, or choose multi-GPU without {name} in `accelerate config`")
    state = sys.modules.get("accelerate.state")  # no Accelerate state can exist before Accelerate is imported
    if state is not None:
        kind = _type_name(state.AcceleratorState._shared_state.get("distributed_type"))
        if kind in UNSUPPORTED_BACKENDS:
            raise _refusal(kind, "this process's Accelerate state was set up for it",
                           "Train in a fresh process launched with DDP")


def check_accelerator(accelerator: Any) -> None:
    """Refuse an `accelerate.Accelerator` whose distributed type shards the model (FSDP, DeepSpeed, Megatron-LM).

    Args:
        accelerator: the run's Accelerator, just built.

    Raises:
        UnsupportedDistributionError: as `check_launch`.
    """
    kind = _type_name(accelerator.distributed_type)
    if kind in UNSUPPORTED_BACKENDS:
        raise _refusal(kind, f"Accelerate set the run up as {kind}", "Launch with DDP instead")


def _type_name(distributed_type: Any) -> str | None:
    """'FSDP' for DistributedType.FSDP (or the string 'FSDP'); None for None."""
    if distributed_type is None:
        return None
    return str(getattr(distributed_type, "name", distributed_type)).upper()


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
