"""The `medunifier` application: the root options, the top-level commands and the command groups, assembled in the
order `medunifier --help` lists them."""

from __future__ import annotations

from pathlib import Path

import typer

from medunifier.cli.common import fail_on
from medunifier.cli.config import config_app
from medunifier.cli.data import data_app
from medunifier.cli.demo import demo
from medunifier.cli.eval import eval_app
from medunifier.cli.generate import generate_app
from medunifier.cli.pretrain import pretrain, pretrain_vision_cmd
from medunifier.cli.serve import ask_cmd, classify_cmd, index_app, report_cmd, serve

__all__ = ["app", "main"]

app = typer.Typer(
    name="medunifier",
    help="Unified medical vision-language models: understand (retrieve, classify, report, answer) "
    "and generate (synthesise, reconstruct, edit) medical images with one model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(generate_app, name="generate")
app.add_typer(index_app, name="index")
app.add_typer(config_app, name="config")

app.command("pretrain")(pretrain)
app.command("pretrain-vision")(pretrain_vision_cmd)
app.command("report")(report_cmd)
app.command("classify")(classify_cmd)
app.command("ask")(ask_cmd)
app.command("serve")(serve)
app.command("demo")(demo)


@app.callback()
def _options(
    image_root: Path | None = typer.Option(
        None, "--image-root", help="let manifest image paths resolve anywhere inside this folder (default: only "
        "inside each manifest's own folder); paths stay relative to the manifest's folder"),
) -> None:
    """Options of every command."""
    from medunifier.data.manifest import set_image_root

    with fail_on(FileNotFoundError):
        set_image_root(image_root)


def main() -> None:
    """Run the command line (the `medunifier` console script and `python -m medunifier.cli`)."""
    app()
