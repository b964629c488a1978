"""`medunifier demo`: the whole system on a CPU in minutes."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["demo"]


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder"),
    minutes: float = typer.Option(10.0, help="training budget of stage 1 (the image-text encoder and generator)"),
    stage0_minutes: float = typer.Option(3.0, help="budget of stage 0 (the vision backbone), report embeddings "
                                         "included"),
    prior_minutes: float | None = typer.Option(None, help="training budget of the code priors (default minutes/2)"),
    n_images: int = typer.Option(6000, help="SynthCXR images to generate (plus the 5x200 set)"),
) -> None:
    """The whole system on a CPU in minutes: SynthCXR, stage 0, the frozen-encoder model, priors, evaluation,
    an HTML report."""
    from medunifier.demo import run_demo

    run_demo(out, minutes=minutes, prior_minutes=prior_minutes, n_images=n_images, stage0_minutes=stage0_minutes)

