"""Using a trained model from the shell: `report`, `classify`, `ask`, the similar-case `index` and the REST
`serve`r."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from medunifier.cli.common import DeviceOption, ModelOption, console, csv_list, fail, fail_on

__all__ = ["ask_cmd", "classify_cmd", "index_app", "report_cmd", "serve"]

index_app = typer.Typer(help="Similar-case index: embed a manifest's cases (safetensors + JSON), query it.",
                        no_args_is_help=True)


def _load_copilot(ckpt: Path, device: str | None, index: Path | None = None, generator: str | None = "auto"):
    from medunifier.serve.api import Copilot

    with fail_on(FileNotFoundError, ValueError, RuntimeError):
        return Copilot.from_pretrained(ckpt, index=index, device=device, generator=generator)


def _read_inputs(copilot, images: list[Path]) -> list:
    from medunifier.data.images import ImageLoadError

    arrays = []
    for path in images:
        with fail_on(ImageLoadError, ValueError):
            arrays.append(copilot.to_array(path))
    return arrays


def report_cmd(
    images: list[Path] = typer.Argument(..., help="PNG, JPEG or DICOM files"),
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON: [{image, report}]"),
    num_beams: int = typer.Option(3, help="beam width"),
    max_length: int | None = typer.Option(None, help="maximum generated tokens (default: the model's)"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
    device: DeviceOption = None,
) -> None:
    """Draft a report for each image (a machine draft for a radiologist to review)."""
    if num_beams < 1 or batch_size < 1:
        fail("--num-beams and --batch-size must be at least 1")
    copilot = _load_copilot(ckpt, device, generator=None)
    arrays = _read_inputs(copilot, images)
    reports = []
    for start in range(0, len(arrays), batch_size):
        reports += copilot.report(arrays[start : start + batch_size], num_beams=num_beams, max_length=max_length)
    if as_json:
        print(json.dumps([{"image": str(p), "report": r} for p, r in zip(images, reports)], indent=2))
        return
    for path, text in zip(images, reports):
        console.print(f"[bold]{path}[/bold]\n{text}\n")


def classify_cmd(
    images: list[Path] = typer.Argument(..., help="PNG, JPEG or DICOM files"),
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    labels: str | None = typer.Option(None, help="comma-separated labels or prompts (default: the five "
                                      "competition findings); known findings use the shipped prompt ensembles"),
    prompts: str = typer.Option("chexpert5", help="prompt YAML file or shipped set for known finding names"),
    ensemble: str = typer.Option("mean", help="prompt ensembling: mean, max or embedding"),
    as_json: bool = typer.Option(False, "--json", help="print JSON: [{image, probabilities, top}]"),
    device: DeviceOption = None,
) -> None:
    """Zero-shot classification: probability of each label for each image."""
    from medunifier.serve.api import Copilot

    if ensemble not in ("mean", "max", "embedding"):
        fail(f"--ensemble must be mean, max or embedding, got {ensemble}")
    names = csv_list(labels)
    if names is not None and not names:
        fail("--labels is empty")
    with fail_on(FileNotFoundError, ValueError, RuntimeError):
        copilot = Copilot.from_pretrained(ckpt, device=device, prompts=prompts, generator=None)
        arrays = _read_inputs(copilot, images)
        results = copilot.classify(arrays, names, ensemble=ensemble)
    if as_json:
        print(json.dumps([{"image": str(p), "probabilities": r.as_dict(), "top": r.top()[0]}
                          for p, r in zip(images, results)], indent=2))
        return
    table = Table(title=f"zero-shot probabilities ({ensemble} ensemble)")
    table.add_column("label", no_wrap=True)
    for path in images:
        table.add_column(path.name, justify="right", overflow="fold")
    for i, name in enumerate(results[0].labels):
        table.add_row(name, *[f"{r.probabilities[i]:.3f}" for r in results])
    console.print(table)


def ask_cmd(
    image: Path = typer.Argument(..., help="a PNG, JPEG or DICOM file"),
    question: str = typer.Argument(..., help='the question, e.g. "Is there a pleural effusion?"'),
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    candidates: str | None = typer.Option(None, help="comma-separated answers to choose from (e.g. yes,no): "
                                          "each is scored by its log-likelihood; default: a generated answer"),
    max_length: int = typer.Option(16, help="maximum generated answer tokens"),
    num_beams: int = typer.Option(1, help="beam width of a generated answer"),
    as_json: bool = typer.Option(False, "--json", help="print JSON: {image, question, answer, candidates}"),
    device: DeviceOption = None,
) -> None:
    """Answer a question about an image (and print each candidate's score with --candidates)."""
    options = csv_list(candidates)
    if options is not None and not options:
        fail("--candidates is empty")
    if max_length < 1 or num_beams < 1:
        fail("--max-length and --num-beams must be at least 1")
    copilot = _load_copilot(ckpt, device, generator=None)
    array = _read_inputs(copilot, [image])[0]
    with fail_on(ValueError):
        result = copilot.ask(array, question, candidates=options, max_length=max_length, num_beams=num_beams)
    if as_json:
        print(json.dumps({"image": str(image), **result.to_dict()}, indent=2))
        return
    console.print(f"[bold]{result.question}[/bold]\n{result.answer}")
    if result.candidates:
        table = Table(title="candidate answers")
        for col in ("answer", "log-likelihood", "probability"):
            table.add_column(col, justify="left" if col == "answer" else "right")
        for c in result.candidates:
            table.add_row(c.answer, f"{c.log_likelihood:.3f}", f"{c.probability:.3f}")
        console.print(table)


@index_app.command("build")
def index_build(
    ckpt: ModelOption,
    data: Path = typer.Option(..., help="a manifest.jsonl (records with an image are indexed)"),
    out: Path = typer.Option(..., help="index folder: embeddings.safetensors + index.json"),
    split: str | None = typer.Option(None, help="index only this split of a multi-split manifest"),
    batch_size: int = typer.Option(64, help="images per forward pass"),
    device: DeviceOption = None,
) -> None:
    """Embed a manifest's cases (images and reports) for similar-case retrieval."""
    import time

    from medunifier.serve.api import model_checksum, resolve_model_dir
    from medunifier.serve.index import build_index

    copilot = _load_copilot(ckpt, device, generator=None)
    model_dir = resolve_model_dir(ckpt).resolve()
    start = time.perf_counter()
    with fail_on(FileNotFoundError, ValueError):
        index = build_index(copilot.model, data, out, split=split, batch_size=batch_size,
                            model_meta={"dir": str(model_dir), "checksum": model_checksum(model_dir)})
    seconds = time.perf_counter() - start
    console.print(f"indexed {len(index)} cases of {data} in {seconds:.1f} s "
                  f"({len(index) / max(seconds, 1e-9):.0f} cases/s) into {out}")


@index_app.command("query")
def index_query(
    index: Path = typer.Argument(..., help="an index folder from `medunifier index build`"),
    image: Path | None = typer.Option(None, help="query image (PNG, JPEG or DICOM)"),
    text: str | None = typer.Option(None, help="query text"),
    k: int = typer.Option(5, "-k", "--k", help="number of cases"),
    mode: str = typer.Option("auto", help="compare with the indexed reports (text) or images (image); auto: "
                             "an image query against reports, a text query against images"),
    ckpt: Path | None = typer.Option(None, help="the model (default: the one that built the index)"),
    as_json: bool = typer.Option(False, "--json", help="print the hits as JSON"),
    device: DeviceOption = None,
) -> None:
    """The k indexed cases most similar to an image or a text (cosine similarity)."""
    from medunifier.serve.index import EmbeddingIndex

    if (image is None) == (text is None):
        fail("give exactly one of --image and --text")
    if k < 1:
        fail("-k must be at least 1")
    if mode not in ("auto", "text", "image"):
        fail(f"--mode must be auto, text or image, got {mode}")
    with fail_on(FileNotFoundError, ValueError):
        idx = EmbeddingIndex.load(index)
    model_dir = ckpt or (idx.meta.get("model") or {}).get("dir")
    if model_dir is None:
        fail(f"{index} does not record its model: pass --ckpt")
    copilot = _load_copilot(Path(model_dir), device, generator=None)
    with fail_on(ValueError, RuntimeError):
        copilot.set_index(idx)
        query = text if text is not None else copilot.to_array(image)
        hits = copilot.retrieve(query, k=k, mode=mode)
    if as_json:
        print(json.dumps([h.to_dict() for h in hits], indent=2))
        return
    table = Table(title=f"{len(hits)} most similar of {len(idx)} cases")
    for col in ("rank", "score", "id", "image", "text"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.3f}", h.id, h.image or "", h.text[:100])
    console.print(table)


def serve(
    ckpt: ModelOption,
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(8000, help="TCP port"),
    token_file: Path | None = typer.Option(None, help="file whose first line is the bearer token clients must send"),
    index: Path | None = typer.Option(None, help="an index folder for similar-case retrieval"),
    settings: Path | None = typer.Option(None, help="YAML/JSON file of limits (see medunifier.serve.settings)"),
    device: DeviceOption = None,
    threads: int | None = typer.Option(None, help="torch intra-op threads (default: torch's choice)"),
    overrides: list[str] | None = typer.Argument(None, help="limit overrides such as max_upload_bytes=5000000"),
) -> None:
    """Serve a trained model over REST (FastAPI) with the web co-pilot page at /."""
    import logging

    import torch
    import uvicorn

    from medunifier.serve.app import create_app
    from medunifier.serve.settings import SettingsError, is_loopback, load_settings

    with fail_on(SettingsError):
        limits = load_settings(settings, overrides or [], token_file)
    loopback = is_loopback(host)
    if not loopback and limits.token is None:
        console.print(f"[yellow]warning:[/yellow] binding to {host} without --token-file: anyone who can reach "
                      "this port can use the model")
    if not loopback and limits.allowed_hosts is None:
        console.print(f"[yellow]note:[/yellow] binding to {host}: any Host header is accepted; list the names "
                      "clients use in allowed_hosts (settings) to refuse DNS-rebinding requests")
    if threads is not None:
        if threads < 1:
            fail("--threads must be at least 1")
        torch.set_num_threads(threads)
    copilot = _load_copilot(ckpt, device, index=index)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not copilot.can_generate:
        console.print(f"[yellow]note:[/yellow] synthesis and editing are off ({copilot.generation_reason})")
    console.print(f"serving {copilot.model_dir} ({copilot.checksum}) on http://{host}:{port}/ "
                  + (f"with {len(copilot.index)} indexed cases" if copilot.index is not None else "without an index"))
    uvicorn.run(create_app(copilot, limits, bind_host=host), host=host, port=port, log_level="info", workers=1)

