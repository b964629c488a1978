"""`medunifier config`: presets and what each of their fields means."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from medunifier.cli.common import console, fail_on

__all__ = ["config_app"]

config_app = typer.Typer(help="Presets and their fields.", no_args_is_help=True)


@config_app.command("show")
def config_show_cmd(
    preset: str = typer.Argument("tiny", help="preset name (tiny, base, paper, ...) or a YAML file"),
    overrides: list[str] | None = typer.Argument(None, help="config overrides such as train.lr=3e-4"),
    stage0: bool = typer.Option(False, "--stage0", help="PRESET is a stage-0 YAML file ('default' for the "
                                "built-in stage 0), as `pretrain-vision --config` takes"),
) -> None:
    """Every field of a validated config: its value and what it means."""
    from medunifier.config import ConfigError, describe_fields, load_config, load_stage0_config

    with fail_on(ConfigError):
        if stage0:
            cfg = load_stage0_config(None if preset == "default" else preset, overrides or [])
        else:
            cfg = load_config(preset, overrides or [])
    table = Table(title=f"{cfg.name}", show_lines=False)
    for column in ("field", "value", "description"):
        table.add_column(column, overflow="fold")
    for key, value, description in describe_fields(cfg):
        table.add_row(key, json.dumps(value), description)
    console.print(table)

