"""`medunifier data`: SynthCXR, converters from public layouts, manifests, quality control, tokenizer, shards and
the frozen-feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from medunifier.cli.common import console, fail, fail_on

__all__ = ["data_app"]

data_app = typer.Typer(help="Datasets: SynthCXR, converters from public layouts, manifests, tokenizer, shards.",
                       no_args_is_help=True)


@data_app.command("info")
def data_info(
    manifest: Path = typer.Argument(..., help="a manifest.jsonl file"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Counts by split, source, task and modality, and label prevalence, of a manifest."""
    from medunifier.data.manifest import read_manifest, summarize

    with fail_on(FileNotFoundError):
        records, report = read_manifest(manifest)
    for err in report.errors:
        console.print(f"[yellow]skipped[/yellow] {err}")
    summary = summarize(records)
    summary["skipped_lines"] = report.skipped  # each left-out line once: bad records and later duplicate ids
    summary["skipped_by_reason"] = report.by_reason()
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"[bold]{manifest}[/bold]: {summary['records']} records "
                  f"({summary['with_image']} with an image, {report.skipped} lines skipped"
                  + "".join(f", {n} {reason}" for reason, n in report.by_reason().items()) + ")")
    for key in ("split", "source", "task", "modality"):
        console.print(f"  {key}: " + ", ".join(f"{k}={v}" for k, v in summary[key].items()))
    if summary["labels"]:
        table = Table(title="label prevalence")
        for col in ("label", "positive", "labelled", "prevalence"):
            table.add_column(col, justify="right" if col != "label" else "left")
        for name, row in summary["labels"].items():
            table.add_row(name, str(row["positive"]), str(row["labelled"]), f"{row['prevalence']:.3f}")
        console.print(table)


@data_app.command("convert")
def data_convert(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="mimic-cxr, iu-xray, chexpert, rsna, siim, covidx, "
                              "vqa-rad, slake, medmnist or ixi"),
    root: Path = typer.Option(..., help="the dataset in its official layout (folder; the .npz for medmnist; "
                              "the folder or the reports .tgz for iu-xray)"),
    out: Path = typer.Option(..., help="output folder: manifest.jsonl, images/, conversion.json"),
    image_size: int | None = typer.Option(None, help="resize to PNG so the short side (both with --square) is "
                                          "this; without it PNG/JPEG files are copied as they are"),
    square: bool = typer.Option(False, "--square", help="resize to image-size x image-size"),
    min_size: int | None = typer.Option(None, help="drop images whose short side is below this (default 32; "
                                        "0 for medmnist)"),
    keep_text_only: bool = typer.Option(False, "--keep-text-only", help="keep reports whose image is absent "
                                        "(image null), e.g. for tokenizer training (mimic-cxr, iu-xray)"),
    seed: int = typer.Option(0, help="seed of drawn splits, 5x200 sampling and caption phrasing"),
    images: Path | None = typer.Option(None, help="iu-xray: the folder of PNG images"),
    reports_root: Path | None = typer.Option(None, help="mimic-cxr: folder holding files/pXX/pID/sID.txt"),
    uncertain: str | None = typer.Option(None, help="mimic-cxr, chexpert: -1 labels: keep, zeros, ones, ignore"),
    one_per_study: bool = typer.Option(False, "--one-per-study", help="mimic-cxr: one frontal image per study"),
    require_findings: bool = typer.Option(False, "--require-findings", help="iu-xray: drop reports without "
                                          "FINDINGS"),
    five_by_200: bool = typer.Option(False, "--five-by-200", help="chexpert: write only the 5x200 set"),
    per_class: int | None = typer.Option(None, help="chexpert --five-by-200: images per finding (default 200)"),
    val_fraction: float | None = typer.Option(None, help="fraction for val of a drawn split (vqa-rad: of the "
                                              "train images, default 0)"),
    test_fraction: float | None = typer.Option(None, help="fraction for test of a drawn split"),
    flag: str | None = typer.Option(None, help="medmnist: dataset name (default from the file name)"),
    lang: str | None = typer.Option(None, help="slake: question language en (default), zh or all"),
    contrast_pairs: str | None = typer.Option(None, help="ixi: translate records for these 'source:target' "
                                              "contrast pairs (default t2:pd,pd:t2)"),
    qc: bool = typer.Option(False, "--qc", help="run `data qc` at the end: the converter's manifest becomes "
                            "manifest.raw.jsonl, the checked one manifest.jsonl, plus qc_report.json/.html"),
) -> None:
    """Convert a public dataset from its official layout to a manifest (+ PNG images), with quality control."""
    from medunifier.data.converters import ConversionError, convert

    given = {
        "image_size": image_size, "square": square or None, "min_size": min_size,
        "keep_text_only": keep_text_only or None, "images": images, "reports_root": reports_root,
        "uncertain": uncertain, "one_per_study": one_per_study or None,
        "require_findings": require_findings or None, "five_by_200": five_by_200 or None,
        "per_class": per_class, "val_fraction": val_fraction, "test_fraction": test_fraction, "flag": flag,
        "lang": lang, "pairs": contrast_pairs,
    }
    options = {k: v for k, v in given.items() if v is not None}
    with fail_on(ConversionError, FileNotFoundError):
        summary = convert(fmt, root, out, seed=seed, **options)
    for line in summary.lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if summary.records == 0:
        fail("no records written (see above)", 1)
    if qc:
        raw = out / "manifest.raw.jsonl"
        (out / "manifest.jsonl").replace(raw)
        _run_qc(raw, out / "manifest.jsonl")


def _run_qc(manifest: Path, out: Path, **kwargs) -> None:
    from medunifier.data.qc import run_qc

    with fail_on(FileNotFoundError, ValueError):
        result = run_qc(manifest, out, **kwargs)
    counts = ", ".join(f"{reason} {n}" for reason, n in result.by_reason().items()) or "nothing found"
    console.print(f"qc: {result.records} records, kept {result.kept}, dropped {result.dropped} ({counts})",
                  highlight=False)
    console.print(f"wrote {result.manifest}, {result.report_json}, {result.report_html}", highlight=False)


@data_app.command("qc")
def data_qc(
    manifest: Path = typer.Argument(..., help="the manifest.jsonl to check (never modified)"),
    out: Path = typer.Option(..., help="the cleaned manifest.jsonl; qc_report.json and qc_report.html go beside it"),
    keep: bool = typer.Option(False, "--keep", help="flag problems (qc_flags on each record) instead of dropping"),
    near_bits: int = typer.Option(10, help="near duplicates: dHash distance (of 256 bits) at or below this"),
    min_words: int = typer.Option(3, help="reports and captions with fewer words are dropped"),
    max_aspect: float = typer.Option(3.0, help="images with a longer/shorter side ratio above this are dropped"),
    views: bool = typer.Option(True, help="drop chest X-rays whose recorded view is not PA or AP"),
    labels: bool = typer.Option(True, help="drop records whose 0/1 labels the report labeler reads otherwise"),
) -> None:
    """Check a manifest's images and reports; write a cleaned manifest and a report of what was dropped and why."""
    from medunifier.data.qc import QCSettings

    settings = QCSettings(near_bits=near_bits, min_words=min_words, max_aspect=max_aspect, check_views=views,
                          check_labels=labels)
    _run_qc(manifest, out, settings=settings, keep=keep)


@data_app.command("merge")
def data_merge(
    manifests: list[Path] = typer.Argument(..., help="manifest.jsonl files to merge"),
    out: Path = typer.Option(..., help="the merged manifest.jsonl (image paths are rewritten relative to it)"),
) -> None:
    """Merge manifests of several sources into one (for multi-source, multi-modality training)."""
    from medunifier.data.manifest import ManifestError, merge_manifests

    with fail_on(FileNotFoundError, ManifestError):
        counts = merge_manifests(manifests, out)
    for path, n in counts.items():
        console.print(f"{n:>8} records from {path}")
    console.print(f"wrote {sum(counts.values())} records to {out}")
    outside = [p for p in counts if not Path(p).resolve().parent.is_relative_to(out.resolve().parent)]
    if outside:
        import os

        common = os.path.commonpath([out.resolve().parent, *(Path(p).resolve().parent for p in outside)])
        console.print(f"note: its image paths leave {out.parent}; read it with `medunifier --image-root {common} ...`")


@data_app.command("tokenizer")
def data_tokenizer(
    manifests: list[Path] = typer.Option(..., "--manifest", help="a manifest.jsonl (repeat for several)"),
    out: Path = typer.Option(..., help="folder to save the tokenizer to (loads with text.tokenizer=DIR)"),
    vocab_size: int = typer.Option(8000, help="WordPiece vocabulary size, special tokens included"),
    min_frequency: int = typer.Option(2, help="least count for a merged WordPiece"),
) -> None:
    """Train a lower-cased BERT WordPiece tokenizer on the reports, questions and answers of manifests."""
    from medunifier.data.manifest import load_records
    from medunifier.data.tokenizer import special_ids, train_tokenizer

    texts: list[str] = []
    for manifest in manifests:
        with fail_on(FileNotFoundError):
            records = load_records(manifest)
        texts += [t for r in records for t in (r.text, r.question, r.answer) if t and t.strip()]
    if not texts:
        fail("the manifests hold no text to train on")
    with fail_on(ValueError):
        tok = train_tokenizer(texts, out, vocab_size=vocab_size, min_frequency=min_frequency)
    console.print(f"trained on {len(texts)} texts: vocabulary {len(tok)} ({vocab_size} asked), "
                  f"special ids {special_ids(tok)}; saved to {out}")


@data_app.command("shards")
def data_shards(
    manifest: Path = typer.Argument(..., help="a manifest.jsonl file"),
    out: Path = typer.Option(..., help="folder for shard-NNNNNN.tar files and shards.json"),
    shard_size: int = typer.Option(1000, help="samples per shard"),
    split: list[str] | None = typer.Option(None, help="keep only these splits (repeatable)"),
) -> None:
    """Write a manifest as WebDataset tar shards (image bytes as stored + the record as JSON)."""
    from medunifier.data.shards import INDEX_NAME, read_index, write_shards

    if shard_size < 1:
        fail("--shard-size must be at least 1")
    with fail_on(FileNotFoundError):
        paths = write_shards(manifest, out, shard_size=shard_size, splits=split or None)
    index = read_index(out)
    for reason in index["skipped"]:
        console.print(f"[yellow]skipped[/yellow] {reason}")
    console.print(f"wrote {index['total']} samples in {len(paths)} shards to {out} "
                  f"({len(index['skipped'])} records left out); index: {out / INDEX_NAME}")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="output folder: images/, manifest.jsonl, images_5x200/, manifest_5x200.jsonl"),
    n: int = typer.Option(10_000, help="images in the main set (split 80/10/10 train/val/test)"),
    size: int = typer.Option(128, help="image side in pixels"),
    seed: int = typer.Option(0, help="the same seed gives byte-identical files"),
    workers: int | None = typer.Option(None, help="worker processes (default: all CPU cores)"),
    per_class_5x200: int = typer.Option(200, "--per-class-5x200",
                                        help="images per competition finding in the 5x200 set (0: none)"),
    pairs: int = typer.Option(0, help="counterfactual pairs (same patient without / with one added finding): "
                              "two report records and one edit record each, in manifest.jsonl"),
    i2i: int = typer.Option(0, "--i2i", help="image-to-image phantoms (images_i2i/): translate (radiograph -> "
                            "bone-suppressed / bone image), upscale (x2, x4 -> full) and segment (finding masks) "
                            "records, in manifest.jsonl"),
) -> None:
    """Generate SynthCXR: chest-radiograph-like images with reports and labels, seeded and offline."""
    import time

    from medunifier.data.synthcxr import write_synthcxr

    if n < 0 or per_class_5x200 < 0 or pairs < 0 or i2i < 0:
        fail("--n, --per-class-5x200, --pairs and --i2i must be >= 0")
    if i2i and size % 4:
        fail(f"--i2i needs a --size divisible by 4 (the x4 low-resolution copy), got {size}")
    if size < 16:
        fail("--size must be at least 16")
    if workers is not None and workers < 1:
        fail("--workers must be at least 1")
    start = time.perf_counter()
    summary = write_synthcxr(out, n=n, size=size, seed=seed, workers=workers, per_class_5x200=per_class_5x200,
                             pairs=pairs, i2i=i2i)
    seconds = time.perf_counter() - start
    total = n + 5 * per_class_5x200 + 2 * pairs + 5 * i2i
    console.print(f"wrote {total} images of {size}x{size} to {out} in {seconds:.1f} s "
                  f"({total / max(seconds, 1e-9):.0f} images/s); splits: "
                  + ", ".join(f"{k}={v}" for k, v in summary["splits"].items()))
    console.print("prevalence: " + ", ".join(f"{k}={v:.3f}" for k, v in summary["prevalence"].items()))
    if pairs:
        console.print(f"{pairs} counterfactual pairs in images_pairs/, adding: "
                      + ", ".join(f"{k}={v}" for k, v in summary["pair_findings"].items()))
    if i2i:
        console.print(f"{i2i} image-to-image phantoms in images_i2i/: "
                      + ", ".join(f"{k}={v}" for k, v in summary["i2i_tasks"].items()) + " records")



@data_app.command("features")
def data_features(
    vision: Path = typer.Option(..., help="a vision backbone folder (e.g. written by `medunifier pretrain-vision`)"),
    data: Path = typer.Option(..., help="a manifest.jsonl"),
    out: Path = typer.Option(..., help="cache folder (cache.json, index-*.json, features-*.safetensors)"),
    config: str = typer.Option("tiny_frozen", help="the stage-1 preset or YAML whose image settings the cache uses"),
    shard_size: int = typer.Option(4096, help="entries per safetensors shard"),
    dtype: str = typer.Option("float16", help="float16 (half the disk) or float32"),
    split: list[str] | None = typer.Option(None, help="only these splits (repeatable; default all)"),
    overrides: list[str] | None = typer.Argument(None, help="config overrides such as image.size=128"),
) -> None:
    """Cache a frozen backbone's outputs on disk, keyed by record id and image hash, for
    `pretrain ... vision.feature_cache=OUT`. Several processes: `torchrun ... -m medunifier.cli data features`."""
    from medunifier.config import ConfigError, load_config
    from medunifier.train.features import write_feature_cache

    if dtype not in ("float16", "float32", "bfloat16"):
        fail(f"--dtype must be float16, bfloat16 or float32, not {dtype!r}")
    if shard_size < 1:
        fail("--shard-size must be at least 1")
    with fail_on(ConfigError, FileNotFoundError, ValueError):
        cfg = load_config(config, [*(overrides or []), f"vision.pretrained={vision}", "vision.frozen=true",
                                   "vision.feature_cache=null"])
        summary = write_feature_cache(cfg, data, out, shard_size=shard_size, dtype=dtype, splits=split or None)
    console.print(f"wrote {summary['entries']} feature entries in {summary['shards']} shards to {out} "
                  f"({summary['seconds']:.0f} s); use vision.feature_cache={out}")
