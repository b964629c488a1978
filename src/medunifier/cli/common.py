"""What every command module shares: the console, the error exit and comma-separated option lists."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

__all__ = ["console", "csv_list", "fail"]

console = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `message` as an error and exit.

    Args:
        message: what went wrong and what to change.
        code: the exit status (2: bad input, 1: the run itself failed).
    """
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def csv_list(text: str | None) -> list[str] | None:
    """The non-empty, stripped items of a comma-separated option; None when the option was not given.

    Args:
        text: the option's value, e.g. "yes, no".
    """
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]
