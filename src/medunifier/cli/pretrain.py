"""`medunifier pretrain` (stage 1: the image-text model) and `medunifier pretrain-vision` (stage 0: the vision
backbone). Both run under `torchrun` for several processes."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medunifier.cli.common import console, fail, fail_on

__all__ = ["pretrain", "pretrain_vision_cmd"]


def pretrain(
    config: str = typer.Option("tiny", help="preset name (tiny, base, paper, ...) or a YAML file"),
    data: Path = typer.Option(..., help="a manifest.jsonl or a folder of shards"),
    out: Path = typer.Option(..., help="run folder (config, checkpoints, metrics, samples)"),
    max_steps: int | None = typer.Option(
        None, help="stop this invocation after this many optimiser steps (the learning-rate schedule and "
        "the curriculum still span train.max_steps / the stages; continue later with --resume)"),
    resume: bool = typer.Option(False, help="continue from the newest intact checkpoint in --out (a damaged "
                                "newer one is moved aside to step-N.damaged)"),
    resume_from: Path | None = typer.Option(None, help="continue from this checkpoint folder "
                                            "(RUN/checkpoints/step-N)"),
    overrides: list[str] | None = typer.Argument(None, help="config overrides such as train.lr=3e-4"),
) -> None:
    """Pre-train MedUnifier (ITC, ITM, ITG, TIG) with Hugging Face Accelerate; resumable.

    Several processes: `torchrun --nproc_per_node N -m medunifier.cli pretrain ...`. SIGINT/SIGTERM
    save a checkpoint and exit 0.
    """
    from medunifier.config import ConfigError
    from medunifier.generate.prior_stage import pretrain as pretrain_run
    from medunifier.train.loop import DataError, NonFiniteLossError

    try:
        result = pretrain_run(config, data, out, max_steps=max_steps, resume=resume, overrides=overrides or [],
                              resume_from=resume_from)
    except (ConfigError, DataError, FileNotFoundError) as err:
        fail(str(err))
    except NonFiniteLossError as err:
        fail(str(err), 1)
    if not result.is_main:
        return
    if result.interrupted:
        console.print(f"interrupted at step {result.step}; checkpoint {result.checkpoint}")
        return
    console.print(f"done: step {result.step} ({result.samples_per_s:.1f} samples/s), model in {result.model_dir}, "
                  f"run folder {result.run_dir}")


def pretrain_vision_cmd(
    data: Path = typer.Option(..., help="a manifest.jsonl (its train split is used)"),
    out: Path = typer.Option(..., help="folder for the backbone (a Hugging Face folder); the run goes in OUT/stage0"),
    config: str | None = typer.Option(None, help="a stage-0 YAML file (default: the built-in tiny stage 0)"),
    resume: bool = typer.Option(False, help="continue from the last checkpoint in OUT/stage0"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval",
                                  help="after training: linear probe (and zero-shot for image-text runs) on the "
                                  "manifest's 5x200 set, when it has one"),
    overrides: list[str] | None = typer.Argument(None, help="overrides such as objective=image max_steps=500"),
) -> None:
    """Stage 0: pre-train the vision backbone that `pretrain` then freezes (vision.pretrained=OUT).

    Objectives: image-report contrast against a locked pretrained text encoder (objective=text, default),
    augmented-view contrast for sources without reports (objective=image), or both. Several processes:
    `torchrun --nproc_per_node N -m medunifier.cli pretrain-vision ...`.
    """
    from medunifier.config import ConfigError, load_stage0_config
    from medunifier.eval.stage0 import evaluate_stage0
    from medunifier.train.stage0 import pretrain_vision
    from medunifier.utils import launch_rank_world

    with fail_on(ConfigError, FileNotFoundError, ValueError):
        cfg = load_stage0_config(config, overrides or [])
        result = pretrain_vision(cfg, data, out, resume=resume)
    console.print(f"stage 0: {result.step} steps in {result.seconds / 60:.1f} min; backbone in {result.out_dir} "
                  f"(use vision.pretrained={result.out_dir})")
    five = data.parent / "manifest_5x200.jsonl"
    if evaluate and five.exists() and launch_rank_world()[0] == 0:
        results = evaluate_stage0(out, data, five)
        console.print_json(json.dumps(results))

