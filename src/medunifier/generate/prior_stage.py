"""`medunifier pretrain` end to end: the model's curriculum stages, then the code priors as the last stage.

The training engine (`medunifier.train`) knows nothing of the priors; this caller runs them after it when
`prior.in_pretrain` is set, so the dependency points one way (generate -> train).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medunifier.config import MedUnifierConfig
from medunifier.generate.train_prior import PriorTrainResult, prior_dir_for, train_prior
from medunifier.train.checkpoint import list_checkpoints
from medunifier.train.loop import TrainResult, train

__all__ = ["pretrain", "prior_stage"]


def prior_stage(config: MedUnifierConfig, run_dir: str | Path, data: str | Path) -> PriorTrainResult:
    """The text-conditioned code priors on a finished model (main process, after `model/` is written).

    A rerun continues the priors' own checkpoints, and does nothing once they are complete.

    Args:
        config: the run's config; `config.prior` holds the prior's settings.
        run_dir: the run folder whose `model/` the priors are trained on.
        data: the manifest (or shards) the model trained on.
    """
    resume = bool(list_checkpoints(prior_dir_for(run_dir)))
    print(f"stage 'prior': training the {config.prior.kind} code priors for {config.prior.max_steps} steps",
          flush=True)
    return train_prior(run_dir, data, settings=config.prior, resume=resume)


def pretrain(config: str | Path | MedUnifierConfig, data: str | Path, out: str | Path, **train_kwargs: Any) -> TrainResult:
    """`medunifier.train.train`, then `prior_stage` when `prior.in_pretrain` is set and the schedule finished.

    Args:
        config: a preset name, a YAML path or a config object.
        data: a manifest or a folder of shards.
        out: the run folder.
        train_kwargs: the other arguments of `train` (max_steps, resume, resume_from, overrides).

    Returns:
        The TrainResult, with `prior` set to the PriorTrainResult when the priors were trained in this call.
    """
    result = train(config, data, out, **train_kwargs)
    if result.config is not None and result.config.prior.in_pretrain and result.is_main and result.finished:
        result.prior = prior_stage(result.config, result.run_dir, data)
    return result
