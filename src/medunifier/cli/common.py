"""What every command module shares: the console, the error exit and comma-separated option lists."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

__all__ = ["DeviceOption", "GuidanceOption", "I2IRunOption", "ModelOption", "PriorRunOption", "PriorStepsOption", "console",
           "csv_list", "fail", "fail_on"]

console = Console()

# The options many commands take, with one help text: `device: DeviceOption = None`, `ckpt: ModelOption`.
DeviceOption = Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda when available)")]
ModelOption = Annotated[Path, typer.Option(help="a run folder or a saved model folder")]
PriorRunOption = Annotated[Path, typer.Option(help="a run folder with a trained prior (medunifier generate train-prior)")]
I2IRunOption = Annotated[Path, typer.Option(help="a run with an image-to-image head")]
GuidanceOption = Annotated[float | None, typer.Option(help="classifier-free guidance scale (default: the prior's; "
                                                      "0: unconditional)")]
PriorStepsOption = Annotated[int | None, typer.Option(help="masked prior: decoding steps per level (default: the "
                                                      "prior's)")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` as an error and exit.

    Args:
        message: what went wrong and what to change.
        code: the exit status (2: bad input, 1: the run itself failed).
    """
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@contextmanager
def fail_on(*errors: type[Exception]) -> Iterator[None]:
    """Turn the expected `errors` of the block into an error message and exit status 2 (no traceback).

    Args:
        *errors: the exception types that mean bad input (a missing file, a bad value).
    """
    try:
        yield
    except errors as err:
        fail(str(err))


def csv_list(text: str | None) -> list[str] | None:
    """The non-empty, stripped items of a comma-separated option; None when the option was not given.

    Args:
        text: the option's value, e.g. "yes, no".
    """
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]
