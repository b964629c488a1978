"""Continuing a run: which checkpoint to continue from, whether this config can continue it, and restoring
the model, optimiser, grad scaler, scheduler, RNG and data position from it.

A run resumed on the same number of processes follows bit for bit the trajectory of a run that never
stopped: every process restores its own RNG state and data position. On another process count rank 0's
data position is re-split by the samplers and the RNG starts afresh from the seed and the step.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer

from medunifier.config import ConfigError
from medunifier.train.checkpoint import (
    TRAINER_STATE,
    checkpoint_problem,
    list_checkpoints,
    load_checkpoint,
    resume_checkpoint,
)
from medunifier.train.curriculum import Stage, stage_at, total_steps
from medunifier.train.metrics import truncate_metrics
from medunifier.utils import launch_rank_world

__all__ = ["RestoredRun", "check_resumable", "choose_checkpoint", "restore_run"]


def choose_checkpoint(run_dir: Path, resume: bool, resume_from: str | Path | None) -> Path | None:
    """The checkpoint this invocation continues from, or None for a new run.

    Args:
        run_dir: the run folder (`--out`).
        resume: continue from the newest intact checkpoint in `run_dir` (a damaged newer one is moved
            aside to `step-N.damaged` by the main process).
        resume_from: continue from this checkpoint folder instead.

    Raises:
        ConfigError: `resume_from` is damaged, every checkpoint is, or `run_dir` holds checkpoints and
            neither `resume` nor `resume_from` was given.
    """
    existing = list_checkpoints(run_dir)
    if resume_from is not None:
        checkpoint = Path(resume_from)
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise ConfigError(f"--resume-from {checkpoint}: cannot resume from it ({problem}); pick another "
                              f"checkpoint folder, e.g. an older one under {run_dir / 'checkpoints'}")
        return checkpoint
    if resume:
        checkpoint = resume_checkpoint(run_dir, move_aside=launch_rank_world()[0] == 0)
        if checkpoint is None and existing:
            raise ConfigError(f"{run_dir}: every checkpoint is damaged (moved aside as step-N.damaged): start a "
                              "new run in another --out, or repair one and pass --resume-from")
        if checkpoint is None:
            print(f"warning: --resume given but {run_dir} has no checkpoint: starting a new run", file=sys.stderr)
        return checkpoint
    if existing:
        raise ConfigError(f"{run_dir} already holds checkpoints (latest {existing[-1].name}): pass --resume to "
                          "continue it, or choose another --out")
    return None


def check_resumable(checkpoint: Path, stages: list[Stage]) -> bool:
    """Fail when the checkpoint's curriculum cannot continue under this config; True when stage lengths changed.

    Args:
        checkpoint: the checkpoint folder.
        stages: this config's curriculum.
    """
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    saved = state.get("stages") or []
    if [name for name, _ in saved] != [s.name for s in stages]:
        raise ConfigError(f"{checkpoint} was trained with stages {[n for n, _ in saved]}, this config has "
                          f"{[s.name for s in stages]}")
    if state["step"] > total_steps(stages):
        raise ConfigError(f"{checkpoint} is at step {state['step']}, past this config's {total_steps(stages)} steps")
    changed = [list(x) for x in saved] != [[s.name, s.steps] for s in stages]
    if changed:
        print(f"warning: stage lengths changed from {saved} to {[[s.name, s.steps] for s in stages]}: the "
              "learning-rate schedule follows the new lengths", file=sys.stderr)
    return changed


@dataclass
class RestoredRun:
    """What a checkpoint gives back besides the model and optimiser it loads into place."""

    step: int
    skipped_steps: int
    dropped_samples: int
    samples_seen: int
    scheduler: dict[str, Any] | None  # the scheduler state, when the step is inside the saved stage
    data: dict[str, Any] | None  # this process's data position, when the step is inside the saved stage


def restore_run(checkpoint: Path, model: nn.Module, optimizer: Optimizer, *, scaler: Any, stages: list[Stage],
                rank: int, world: int, seed: int, schedule_changed: bool, run_dir: Path,
                is_main: bool) -> RestoredRun:
    """Load a checkpoint into a freshly built run: model and optimiser in place, grad scaler, RNG; the
    scheduler state and data position are returned for the stage to pick up when it starts.

    Args:
        checkpoint: the checkpoint folder.
        model: the unwrapped model (weights load in place).
        optimizer: the (prepared) optimiser (state loads in place).
        scaler: the fp16 grad scaler, or None.
        stages: this config's curriculum.
        rank: this process's index.
        world: the number of processes of this invocation.
        seed: `train.seed`; re-seeds the RNG when the checkpoint holds no state for this process.
        schedule_changed: the stage lengths differ from the checkpoint's (`check_resumable`): the
            scheduler starts afresh at the step instead of loading its state.
        run_dir: the run folder; the main process drops metric records logged after the checkpoint.
        is_main: this is the main process.
    """
    from accelerate.utils import set_seed

    saved_world = json.loads((checkpoint / TRAINER_STATE).read_text()).get("world_size", world)
    same_world = saved_world == world
    # another process count: rank 0's data position is re-split by the sampler, RNG starts afresh
    trainer_state, rank_state = load_checkpoint(
        checkpoint, model, optimizer, rank=rank if same_world else 0, restore_rng=same_world,
    )
    if not same_world:
        print(f"warning: resuming a {saved_world}-process run on {world} processes: the data "
              "order is re-split (a few samples may repeat)", file=sys.stderr)
    step = int(trainer_state["step"])
    restored = RestoredRun(step=step, skipped_steps=int(trainer_state.get("skipped_steps", 0)),
                           dropped_samples=int(trainer_state.get("dropped_samples", 0)),
                           samples_seen=int(trainer_state.get("samples_seen", 0)), scheduler=None, data=None)
    if scaler is not None and trainer_state.get("scaler"):
        scaler.load_state_dict(trainer_state["scaler"])
    stage_now = stage_at(stages, step)[0]
    if trainer_state.get("stage_index") == stage_now and not schedule_changed:
        restored.scheduler = trainer_state.get("scheduler")
    if not same_world or rank_state is None:
        set_seed(seed + rank + step)
    if rank_state is not None and rank_state.get("stage_index") == stage_now:
        restored.data = rank_state.get("data")
    if is_main:
        dropped = truncate_metrics(run_dir, step)
        print(f"resumed from {checkpoint} at step {step}"
              + (f" (dropped {dropped} metric records logged after it)" if dropped else ""))
    return restored
