"""The `medunifier` command line.

Groups: data (datasets and manifests), pretrain, eval, generate, serve, demo. Implementations
are imported inside each command so that `medunifier --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="medunifier",
    help="Unified medical vision-language models: understand (retrieve, classify, report, answer) "
    "and generate (synthesise, reconstruct, edit) medical images with one model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: SynthCXR, converters from public layouts, manifests, tokenizer, shards.",
                       no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate a trained run: retrieval, zero-shot, fine-tuning, report generation, "
                       "synthesis, ablation.", no_args_is_help=True)
generate_app = typer.Typer(help="Generate images from text, reconstruct and edit images with a trained run.",
                           no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(generate_app, name="generate")

console = Console()


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


# --------------------------------------------------------------------------------------------- data


@data_app.command("info")
def data_info(
    manifest: Path = typer.Argument(..., help="a manifest.jsonl file"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Counts by split, source, task and modality, and label prevalence, of a manifest."""
    from medunifier.data.manifest import read_manifest, summarize

    try:
        records, report = read_manifest(manifest)
    except FileNotFoundError as err:
        _fail(str(err))
    for err in report.errors:
        console.print(f"[yellow]skipped[/yellow] {err}")
    summary = summarize(records)
    summary["skipped_lines"] = report.skipped
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"[bold]{manifest}[/bold]: {summary['records']} records "
                  f"({summary['with_image']} with an image, {report.skipped} bad lines skipped)")
    for key in ("split", "source", "task", "modality"):
        console.print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in summary[key].items()))
    if summary["labels"]:
        table = Table(title="label prevalence")
        for col in ("label", "positive", "labelled", "prevalence"):
            table.add_column(col, justify="right" if col != "label" else "left")
        for name, row in summary["labels"].items():
            table.add_row(name, str(row["positive"]), str(row["labelled"]), f"{row['prevalence']:.3f}")
        console.print(table)


# ------------------------------------------------------------------------------------- top level


@app.command("pretrain")
def pretrain(
    config: str = typer.Option("tiny", help="preset name (tiny, base, paper, ...) or a YAML file"),
    data: Path = typer.Option(..., help="a manifest.jsonl or a folder of shards"),
    out: Path = typer.Option(..., help="run folder (config, checkpoints, metrics, samples)"),
    max_steps: int | None = typer.Option(None, help="stop after this many optimiser steps"),
    resume: bool = typer.Option(False, help="continue from the last checkpoint in --out"),
    overrides: list[str] | None = typer.Argument(None, help="config overrides such as train.lr=3e-4"),
) -> None:
    """Pre-train MedUnifier (ITC, ITM, ITG, TIG) with Hugging Face Accelerate; resumable."""
    _fail("the training engine is not available in this version yet (see the training issue)", 3)


@app.command("serve")
def serve(
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(8000, help="TCP port"),
) -> None:
    """Serve a trained model over REST with a web co-pilot page."""
    _fail("the REST service is not available in this version yet (see the serving issue)", 3)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder"),
    minutes: float = typer.Option(10.0, help="training budget in minutes"),
) -> None:
    """The whole system on a CPU in minutes: SynthCXR, training, evaluation, an HTML report."""
    from medunifier.demo import run_demo

    run_demo(out, minutes=minutes)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
