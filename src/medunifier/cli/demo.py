"""`medunifier demo`: the whole system on a CPU in minutes."""

from __future__ import annotations

from pathlib import Path

import typer

from medunifier.cli.common import fail_on

__all__ = ["demo"]


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder"),
    steps: int | None = typer.Option(None, help="stage-1 steps (the image-text encoder and generator; default 640)"),
    stage0_steps: int | None = typer.Option(None, help="stage-0 steps (the vision backbone; default 480)"),
    prior_steps: int | None = typer.Option(None, help="steps of the code priors (default 270)"),
    minutes: float | None = typer.Option(None, help="fit stage 1 to this wall-clock budget on this machine instead "
                                         "of a step count (the figures then depend on the machine's speed and load)"),
    stage0_minutes: float | None = typer.Option(None, help="the same for stage 0 (report embeddings included)"),
    prior_minutes: float | None = typer.Option(None, help="the same for the code priors"),
    decoder_steps: int | None = typer.Option(None, help="steps refitting the decoder on the frozen codes before "
                                             "the priors (default 600; 0: skip)"),
    n_images: int = typer.Option(6000, help="SynthCXR images to generate (plus the 5x200 set)"),
) -> None:
    """The whole system on a CPU in minutes: SynthCXR, stage 0, the frozen-encoder model, priors, evaluation,
    an HTML report. Fixed step counts by default (about 20 minutes on 2 cores), so the figures do not depend
    on the machine's load."""
    from medunifier.demo import demo_budgets, run_demo

    budgets = dict(steps=steps, stage0_steps=stage0_steps, prior_steps=prior_steps, minutes=minutes,
                   stage0_minutes=stage0_minutes, prior_minutes=prior_minutes)
    with fail_on(ValueError):
        demo_budgets(**budgets)
        if decoder_steps is not None and decoder_steps < 0:
            raise ValueError(f"--decoder-steps must be >= 0 (got {decoder_steps})")
    refit = {} if decoder_steps is None else {"decoder_steps": decoder_steps}
    run_demo(out, n_images=n_images, **refit, **budgets)
