"""The command line as a package: the console script's target, `python -m medunifier.cli`, and the command tree
that `cli.main` assembles from the group modules."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = ["pretrain", "pretrain-vision", "report", "classify", "ask", "serve", "demo",
             "data", "eval", "generate", "index", "config"]
GROUPS = {
    "data": ["info", "convert", "qc", "merge", "tokenizer", "shards", "synth", "features"],
    "eval": ["retrieval", "zeroshot", "finetune", "report", "vqa", "ablation", "experts", "synthesis", "edit", "i2i"],
    "generate": ["train-prior", "refine-decoder", "image", "edit", "reconstruct", "translate", "upscale", "segment"],
    "index": ["build", "query"],
    "config": ["show"],
}


def _entry_point_app() -> typer.Typer:
    # pyproject's [project.scripts] line, read without tomllib (Python 3.10 has none)
    target = re.search(r'^medunifier = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def test_console_script_target_is_the_assembled_app() -> None:
    from medunifier.cli.main import app

    assert _entry_point_app() is app


def test_every_command_is_registered_in_help_order() -> None:
    group = typer.main.get_command(_entry_point_app())
    ctx = typer.Context(group)
    assert list(group.list_commands(ctx)) == TOP_LEVEL
    for name, commands in GROUPS.items():
        sub = group.get_command(ctx, name)
        assert list(sub.list_commands(typer.Context(sub))) == commands, name


def test_a_group_command_still_fails_with_its_message() -> None:
    result = CliRunner().invoke(_entry_point_app(), ["data", "shards", "missing.jsonl", "--out", "x",
                                                     "--shard-size", "0"])
    assert result.exit_code == 2
    assert "--shard-size must be at least 1" in result.output


def test_python_dash_m_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "medunifier.cli", "config", "show", "tiny"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train.lr" in done.stdout
