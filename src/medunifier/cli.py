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
                       "VQA, synthesis, ablation.", no_args_is_help=True)
generate_app = typer.Typer(help="Generate images from text, reconstruct and edit images with a trained run.",
                           no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(generate_app, name="generate")
index_app = typer.Typer(help="Similar-case index: embed a manifest's cases (safetensors + JSON), query it.",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")
config_app = typer.Typer(help="Presets and their fields.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@app.callback()
def _options(
    image_root: Path | None = typer.Option(
        None, "--image-root", help="let manifest image paths resolve anywhere inside this folder (default: only "
        "inside each manifest's own folder); paths stay relative to the manifest's folder"),
) -> None:
    """Options of every command."""
    from medunifier.data.manifest import set_image_root

    try:
        set_image_root(image_root)
    except FileNotFoundError as err:
        _fail(str(err))


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
    try:
        summary = convert(fmt, root, out, seed=seed, **options)
    except (ConversionError, FileNotFoundError) as err:
        _fail(str(err))
    for line in summary.lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if summary.records == 0:
        _fail("no records written (see above)", 1)
    if qc:
        raw = out / "manifest.raw.jsonl"
        (out / "manifest.jsonl").replace(raw)
        _run_qc(raw, out / "manifest.jsonl")


def _run_qc(manifest: Path, out: Path, **kwargs) -> None:
    from medunifier.data.qc import run_qc

    try:
        result = run_qc(manifest, out, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
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

    try:
        counts = merge_manifests(manifests, out)
    except (FileNotFoundError, ManifestError) as err:
        _fail(str(err))
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
        try:
            records = load_records(manifest)
        except FileNotFoundError as err:
            _fail(str(err))
        texts += [t for r in records for t in (r.text, r.question, r.answer) if t and t.strip()]
    if not texts:
        _fail("the manifests hold no text to train on")
    try:
        tok = train_tokenizer(texts, out, vocab_size=vocab_size, min_frequency=min_frequency)
    except ValueError as err:
        _fail(str(err))
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
        _fail("--shard-size must be at least 1")
    try:
        paths = write_shards(manifest, out, shard_size=shard_size, splits=split or None)
    except FileNotFoundError as err:
        _fail(str(err))
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
        _fail("--n, --per-class-5x200, --pairs and --i2i must be >= 0")
    if i2i and size % 4:
        _fail(f"--i2i needs a --size divisible by 4 (the x4 low-resolution copy), got {size}")
    if size < 16:
        _fail("--size must be at least 16")
    if workers is not None and workers < 1:
        _fail("--workers must be at least 1")
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


# --------------------------------------------------------------------------------------------- eval


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _eval_out(out: Path | None, ckpt: Path, name: str) -> Path:
    return out if out is not None else Path(ckpt) / "eval" / name


_EVAL_ERRORS = (FileNotFoundError, ValueError, ImportError)


@eval_app.command("retrieval")
def eval_retrieval(
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    data: Path = typer.Option(..., help="a 5x200-style manifest (one positive finding per image)"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/retrieval)"),
    classes: str | None = typer.Option(None, help="comma-separated classes (default: the five competition findings)"),
    k: str = typer.Option("1,5,10", help="comma-separated K values"),
    split: str | None = typer.Option(None, help="keep this split of a multi-split manifest"),
    batch_size: int = typer.Option(64, help="images per forward pass"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Image-to-text and text-to-image retrieval: mAP@K (PRIOR/CXR-CLIP), Recall@K, mean rank."""
    from medunifier.eval.retrieval import run_retrieval

    try:
        run_retrieval(ckpt, data, _eval_out(out, ckpt, "retrieval"), classes=_csv(classes),
                      ks=[int(x) for x in _csv(k)], split=split, batch_size=batch_size, device=device, console=console)
    except _EVAL_ERRORS as err:
        _fail(str(err))


@eval_app.command("zeroshot")
def eval_zeroshot(
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    data: Path = typer.Option(..., help="a labelled manifest"),
    prompts: str = typer.Option("chexpert5", help="prompt YAML file, or a shipped set: chexpert5, pneumonia"),
    ensemble: str = typer.Option("mean", help="prompt ensembling: mean, max or embedding"),
    seed: int | None = typer.Option(None, help="prompt sampling seed (default: the file's)"),
    max_prompts: int | None = typer.Option(None, help="prompts per class (default: the file's)"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/zeroshot)"),
    split: str | None = typer.Option(None, help="keep this split of a multi-split manifest"),
    batch_size: int = typer.Option(64, help="images per forward pass"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Zero-shot classification with GLoRIA-style prompt ensembles: accuracy, macro-F1, AUROC."""
    from medunifier.eval.zeroshot import run_zeroshot

    if ensemble not in ("mean", "max", "embedding"):
        _fail(f"--ensemble must be mean, max or embedding, got {ensemble}")
    try:
        run_zeroshot(ckpt, data, prompts, _eval_out(out, ckpt, "zeroshot"), ensemble=ensemble, seed=seed,
                     max_prompts=max_prompts, split=split, batch_size=batch_size, device=device, console=console)
    except _EVAL_ERRORS as err:
        _fail(str(err))


@eval_app.command("finetune")
def eval_finetune(
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    train: Path = typer.Option(..., help="training manifest (its 'train' split when it has several)"),
    val: Path | None = typer.Option(None, help="validation manifest (its 'val' split when it has several); "
                                    "without it, --holdout of the training records selects the model"),
    holdout: float = typer.Option(0.1, help="without --val: the stratified share of train held out for selection"),
    test: Path = typer.Option(..., help="test manifest (its 'test' split when it has several)"),
    fractions: str = typer.Option("0.01,0.1,1.0", help="comma-separated label fractions"),
    seeds: int = typer.Option(3, help="number of seeds (0..n-1)"),
    mode: str = typer.Option("linear", help="linear (frozen features + logistic regression) or full"),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="same architecture, random weights, same budget"),
    classes: str | None = typer.Option(None, help="comma-separated classes (default: inferred from the labels)"),
    epochs: int = typer.Option(5, help="epochs of full fine-tuning"),
    lr: float = typer.Option(1e-4, help="AdamW learning rate of full fine-tuning"),
    batch_size: int = typer.Option(32, help="batch size"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/finetune_<mode>[_scratch])"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Linear-probe or full fine-tuning at label fractions; AUROC (binary) or accuracy; mean/std over seeds."""
    from medunifier.eval.finetune import run_finetune

    if mode not in ("linear", "full"):
        _fail(f"--mode must be linear or full, got {mode}")
    name = f"finetune_{mode}" + ("_scratch" if from_scratch else "")
    try:
        run_finetune(ckpt, train, val, test, _eval_out(out, ckpt, name), fractions=[float(f) for f in _csv(fractions)],
                     seeds=seeds, mode=mode, from_scratch=from_scratch, classes=_csv(classes), epochs=epochs, lr=lr,
                     batch_size=batch_size, device=device, console=console, holdout=holdout)
    except _EVAL_ERRORS as err:
        _fail(str(err))


@eval_app.command("report")
def eval_report(
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    data: Path = typer.Option(..., help="a manifest of images with reports"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/report)"),
    split: str | None = typer.Option(None, help="keep this split of a multi-split manifest"),
    target: str = typer.Option("text", help="reference field: text, findings or impression"),
    num_beams: int = typer.Option(3, help="beam width"),
    max_length: int = typer.Option(95, help="maximum generated tokens"),
    repetition_penalty: float = typer.Option(1.0, help="CTRL-style repetition penalty (1 = off)"),
    no_repeat_ngram_size: int = typer.Option(3, help="block repeated n-grams (3 = R2Gen's trigram blocking)"),
    limit: int | None = typer.Option(None, help="score only the first N images"),
    meteor: bool = typer.Option(True, help="compute METEOR (runs Java)"),
    round_trip_refs: bool = typer.Option(True, help="score references decoded from their tokens, as R2Gen does"),
    batch_size: int = typer.Option(16, help="images per generation batch"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Report generation: BLEU-1..4, METEOR, ROUGE-L (R2Gen) and clinical efficacy (labeler P/R/F1)."""
    from medunifier.eval.report import run_report

    if target not in ("text", "findings", "impression"):
        _fail(f"--target must be text, findings or impression, got {target}")
    try:
        run_report(ckpt, data, _eval_out(out, ckpt, "report"), split=split, target=target, num_beams=num_beams,
                   max_length=max_length, repetition_penalty=repetition_penalty,
                   no_repeat_ngram_size=no_repeat_ngram_size, limit=limit, meteor=None if meteor else False,
                   round_trip_refs=round_trip_refs, batch_size=batch_size, device=device, console=console)
    except _EVAL_ERRORS as err:
        _fail(str(err))


@eval_app.command("vqa")
def eval_vqa(
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    data: Path = typer.Option(..., help="a VQA manifest (e.g. from `data convert vqa-rad` or slake)"),
    split: str = typer.Option("val", help="the split to answer (a single-split manifest is used whole); the "
                              "train split gives the closed-answer candidates"),
    closed_scoring: str = typer.Option("likelihood", help="closed questions: likelihood (the best-scoring "
                                       "candidate: yes/no, or the options the question names) or generate"),
    open_scoring: str = typer.Option("generate", help="open questions: generate (decode an answer) or rank "
                                     "(the likeliest of the train split's open answers, BLIP's rank inference)"),
    top_k: int = typer.Option(128, help="--open-scoring rank: candidates kept by first-token likelihood "
                              "before full scoring (0: score the whole answer list)"),
    shuffle_images: bool = typer.Option(False, help="ask each question of another question's image (a fixed "
                                        "permutation): the control for what the question alone gives"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/vqa)"),
    limit: int | None = typer.Option(None, help="answer only the first N questions"),
    max_length: int = typer.Option(16, help="maximum generated answer tokens"),
    num_beams: int = typer.Option(1, help="beam width of open answers (1: greedy, the training layout exactly)"),
    batch_size: int = typer.Option(32, help="questions per forward pass"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Visual question answering: closed, open and overall accuracy (+ open token recall), by modality and organ."""
    from medunifier.eval.vqa import run_vqa

    if closed_scoring not in ("likelihood", "generate"):
        _fail(f"--closed-scoring must be likelihood or generate, got {closed_scoring}")
    if open_scoring not in ("generate", "rank"):
        _fail(f"--open-scoring must be generate or rank, got {open_scoring}")
    if top_k < 0:
        _fail("--top-k must be 0 (the whole answer list) or more")
    if min(max_length, num_beams, batch_size) < 1 or (limit is not None and limit < 1):
        _fail("--max-length, --num-beams, --batch-size and --limit must be at least 1")
    try:
        run_vqa(ckpt, data, _eval_out(out, ckpt, "vqa"), split=split, device=device, closed_scoring=closed_scoring,
                open_scoring=open_scoring, top_k=top_k or None, shuffle_images=shuffle_images,
                limit=limit, max_length=max_length, num_beams=num_beams, batch_size=batch_size, console=console)
    except _EVAL_ERRORS as err:
        _fail(str(err))


@eval_app.command("ablation")
def eval_ablation(
    config: str = typer.Option("tiny", help="preset name or YAML file"),
    data: Path = typer.Option(..., help="training manifest with train/val/test splits"),
    objectives: str = typer.Option("itc,itc+itm,itc+itm+itg,itc+itm+tig,all", help="comma-separated objective sets"),
    seeds: int = typer.Option(3, help="number of seeds (0..n-1)"),
    steps: int = typer.Option(..., help="training steps of every run"),
    eval_data: Path | None = typer.Option(None, help="retrieval / zero-shot manifest (default: the test split of --data)"),
    prompts: str = typer.Option("chexpert5", help="prompt set for zero-shot (its classes are used everywhere)"),
    fractions: str = typer.Option("0.01,0.1,1.0", help="linear-probe label fractions"),
    out: Path = typer.Option(Path("runs/ablation"), help="output folder (one run folder per set and seed)"),
    resume: bool = typer.Option(False, help="reuse finished runs and resume interrupted ones in --out"),
    batch_size: int = typer.Option(64, help="evaluation batch size"),
    device: str | None = typer.Option(None, help="evaluation device (default: cuda when available)"),
    overrides: list[str] | None = typer.Argument(None, help="config overrides such as train.batch_size=16"),
) -> None:
    """Objective ablation (Table 6): train each objective set per seed, evaluate, print mean ± std."""
    from medunifier.eval.ablation import run_ablation

    try:
        run_ablation(config, data, out, objectives=_csv(objectives), seeds=seeds, steps=steps, eval_data=eval_data,
                     prompts=prompts, fractions=[float(f) for f in _csv(fractions)], overrides=overrides or None,
                     resume=resume, batch_size=batch_size, device=device, console=console)
    except _EVAL_ERRORS as err:
        _fail(str(err))


@eval_app.command("experts")
def eval_experts(
    config: str = typer.Option("tiny", help="preset name or YAML file"),
    data: Path = typer.Option(..., help="training manifest (train/val splits; its train images also train the "
                              "consistency classifier)"),
    seeds: int = typer.Option(3, help="number of seeds (0..n-1), the same for every variant"),
    steps: int = typer.Option(..., help="training steps of every run"),
    variants: str = typer.Option("shared,task", help="comma-separated encoder.experts values"),
    eval_data: Path | None = typer.Option(None, help="retrieval / zero-shot / synthesis reference manifest "
                                           "(default: manifest_5x200.jsonl beside --data, else its test split)"),
    prompts: str = typer.Option("chexpert5", help="prompt set for zero-shot"),
    vqa_data: Path | None = typer.Option(None, help="VQA manifest: one more run per variant and seed on it, "
                                          "then VQA accuracy on --vqa-split"),
    vqa_split: str = typer.Option("val", help="split of --vqa-data to score"),
    vqa_objectives: str = typer.Option("itg+tig", help="objectives of the VQA run ('+'-joined)"),
    synthesis: bool = typer.Option(True, help="train a prior per run and measure consistency and FID"),
    prior_steps: int = typer.Option(500, help="prior training steps per run"),
    n_generated: int = typer.Option(100, help="images generated per run for consistency and FID"),
    fid: bool = typer.Option(True, help="Inception FID (the domain-feature FID is always computed)"),
    out: Path = typer.Option(Path("runs/experts"), help="output folder (one run folder per variant and seed)"),
    resume: bool = typer.Option(False, help="reuse finished runs and resume interrupted ones in --out"),
    batch_size: int = typer.Option(64, help="evaluation batch size"),
    device: str | None = typer.Option(None, help="evaluation device (default: cuda when available)"),
    overrides: list[str] | None = typer.Argument(None, help="config overrides such as train.batch_size=16"),
) -> None:
    """Shared vs task experts: the same budget and seeds per variant; understanding, VQA and generation."""
    from medunifier.eval.experts import run_experts_ablation

    try:
        run_experts_ablation(config, data, out=out, variants=_csv(variants) or [], seeds=seeds, steps=steps,
                             eval_data=eval_data, prompts=prompts, vqa_data=vqa_data, vqa_split=vqa_split,
                             vqa_objectives=vqa_objectives.split("+"), synthesis=synthesis,
                             prior_steps=prior_steps, n_generated=n_generated, fid=fid,
                             overrides=overrides or None, resume=resume, batch_size=batch_size, device=device,
                             console=console)
    except _EVAL_ERRORS as err:
        _fail(str(err))


@eval_app.command("synthesis")
def eval_synthesis(
    ckpt: Path = typer.Option(..., help="a run folder with a trained prior (medunifier generate train-prior)"),
    data: Path = typer.Option(..., help="manifest with train/val/test splits: trains the consistency classifier; "
                              "its normal test images are the edit sources"),
    eval_data: Path | None = typer.Option(None, help="reference images and prompts (default: manifest_5x200.jsonl "
                                           "beside --data, else the test split of --data)"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/synthesis)"),
    prompts_per_finding: int = typer.Option(20, help="prompts (reports) per competition finding"),
    samples_per_prompt: int = typer.Option(2, help="images generated per prompt (>= 2 for diversity)"),
    guidance: float | None = typer.Option(None, help="classifier-free guidance (default: the prior's)"),
    steps: int | None = typer.Option(None, help="masked prior: decoding steps per level (default: the prior's)"),
    seed: int = typer.Option(0, help="seed of prompt choice, sampling, classifier training"),
    classifier: str = typer.Option("cnn", help="consistency classifier: cnn (pixels, independent of the model) or "
                                   "probe (linear probe on the model's query features)"),
    edits_per_finding: int = typer.Option(10, help="counterfactual edits per finding (0: none)"),
    strength: float = typer.Option(1.0, help="share of the codes re-sampled inside the edit region"),
    fid: bool = typer.Option(True, help="compute Inception FID (the slowest part)"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Synthesis: FID (Inception + domain) with references, finding consistency, diversity, edit metrics."""
    from medunifier.eval.synthesis import run_synthesis

    if classifier not in ("cnn", "probe"):
        _fail(f"--classifier must be cnn or probe, got {classifier}")
    if prompts_per_finding < 1 or samples_per_prompt < 1:
        _fail("--prompts-per-finding and --samples-per-prompt must be >= 1")
    try:
        run_synthesis(ckpt, data, _eval_out(out, ckpt, "synthesis"), eval_data=eval_data,
                      prompts_per_finding=prompts_per_finding, samples_per_prompt=samples_per_prompt,
                      guidance=guidance, steps=steps, seed=seed, classifier=classifier,
                      edits_per_finding=edits_per_finding, edit_strength=strength, fid=fid, device=device,
                      console=console)
    except _EVAL_ERRORS as err:
        _fail(str(err))


@eval_app.command("edit")
def eval_edit(
    ckpt: Path = typer.Option(..., help="a run folder with a trained prior (medunifier generate train-prior)"),
    data: Path = typer.Option(..., help="manifest with edit records (medunifier data synth --pairs N); its train "
                              "images train the finding classifier"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/edit)"),
    split: str = typer.Option("test", help="split of the edit records to evaluate"),
    strength: float = typer.Option(0.6, help="share of the codes re-sampled (inside the region)"),
    region: str = typer.Option("mask", help="mask: edit inside each pair's edit_region; none: anywhere"),
    guidance: float | None = typer.Option(None, help="classifier-free guidance (default: the prior's)"),
    steps: int | None = typer.Option(None, help="masked prior: decoding steps per level (default: the prior's)"),
    seed: int = typer.Option(0, help="seed of the edits and of classifier training"),
    max_pairs: int = typer.Option(200, help="evaluate at most this many pairs"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Edits against ground truth: SSIM / PSNR of edited sources to their targets, finding flip rate."""
    from medunifier.eval.edit import run_edit_eval

    if region not in ("mask", "none"):
        _fail(f"--region must be mask or none, got {region}")
    if not 0.0 <= strength <= 1.0 or max_pairs < 1:
        _fail("--strength must be in [0, 1] and --max-pairs >= 1")
    try:
        run_edit_eval(ckpt, data, _eval_out(out, ckpt, "edit"), split=split, strength=strength, region=region,
                      guidance=guidance, steps=steps, seed=seed, max_pairs=max_pairs, device=device,
                      console=console)
    except _EVAL_ERRORS as err:
        _fail(str(err))


@eval_app.command("i2i")
def eval_i2i(
    ckpt: Path = typer.Option(..., help="a run trained with i2i.enabled=true and 'i2i:' mixture keys"),
    data: Path = typer.Option(..., help="manifest with translate / upscale / segment records (medunifier data synth "
                              "--i2i N); its train radiographs train the survival classifier"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/i2i)"),
    split: str = typer.Option("test", help="split of the records to evaluate"),
    max_per_task: int = typer.Option(300, help="evaluate at most this many records of each task"),
    survival: bool = typer.Option(True, "--survival/--no-survival", help="train the finding classifier and report "
                                  "finding survival through bone suppression"),
    seed: int = typer.Option(0, help="seed of the classifier"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Image-to-image against the truth: PSNR/SSIM beside bicubic (upscale) and the unchanged source
    (translate), Dice/IoU beside an intensity threshold (segment), finding survival through translation."""
    from medunifier.eval.i2i import run_i2i_eval

    if max_per_task < 1:
        _fail("--max-per-task must be >= 1")
    try:
        run_i2i_eval(ckpt, data, _eval_out(out, ckpt, "i2i"), split=split, max_per_task=max_per_task,
                     survival=survival, seed=seed, device=device, console=console)
    except _EVAL_ERRORS as err:
        _fail(str(err))


# ----------------------------------------------------------------------------------------- generate


def _synthesizer(ckpt: Path, device: str | None):
    from medunifier.generate.sampling import Synthesizer

    try:
        return Synthesizer.from_run(ckpt, device=device)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))


@generate_app.command("train-prior")
def generate_train_prior(
    ckpt: Path = typer.Option(..., help="a run folder (its model/ is frozen; the prior goes to <ckpt>/prior)"),
    data: Path = typer.Option(..., help="a manifest.jsonl (train split: training; val split: validation loss)"),
    max_steps: int | None = typer.Option(None, help="stop this invocation after this many steps (the schedule "
                                         "spans prior.max_steps; continue with --resume)"),
    resume: bool = typer.Option(False, help="continue from the last prior checkpoint"),
    minutes: float | None = typer.Option(None, help="stop (with a checkpoint) after this many minutes"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
    overrides: list[str] | None = typer.Argument(None, help="prior settings such as width=128 steps=8 kind=masked "
                                                 "max_steps=3000 (also prior.width=128)"),
) -> None:
    """Train the text-conditioned top and bottom code priors of a run (frozen model; resumable)."""
    from medunifier.config import ConfigError
    from medunifier.generate.train_prior import train_prior
    from medunifier.train.loop import DataError

    try:
        result = train_prior(ckpt, data, overrides=overrides or [], max_steps=max_steps, resume=resume,
                             time_limit_s=None if minutes is None else minutes * 60, device=device,
                             log=console.print)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"prior step {result.step}/{result.total_steps} ({result.samples_per_s:.0f} samples/s) in "
                  f"{result.prior_dir}" + (" (stopped early: continue with --resume)" if result.interrupted else ""))


@generate_app.command("image")
def generate_image(
    text: str = typer.Argument(..., help="the report to draw, e.g. 'Moderate right pleural effusion.'"),
    ckpt: Path = typer.Option(..., help="a run folder with a trained prior"),
    n: int = typer.Option(8, help="number of images"),
    guidance: float | None = typer.Option(None, help="classifier-free guidance scale (0: unconditional)"),
    steps: int | None = typer.Option(None, help="masked prior: decoding steps per level"),
    seed: int = typer.Option(0, help="the same seed gives the same images"),
    temperature: float = typer.Option(1.0, help="sampling temperature (0: greedy)"),
    out: Path = typer.Option(Path("generated"), help="output folder"),
    dicom: bool = typer.Option(False, "--dicom", help="also write DICOM Secondary Capture files marked synthetic"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Text-to-image: sample n images for a report and write them as PNG (and DICOM with --dicom)."""
    from medunifier.data.images import save_png

    if n < 1 or not text.strip():
        _fail("need a non-empty text and --n >= 1")
    synth = _synthesizer(ckpt, device)
    images = synth.generate(text, n=n, guidance=guidance, steps=steps, seed=seed, temperature=temperature)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = series_uid = None
    for i, image in enumerate(images):
        save_png(image, out / f"sample_{i:03d}.png")
        if dicom:
            from pydicom.uid import generate_uid

            from medunifier.generate.dicom import write_secondary_capture

            study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
            write_secondary_capture(image, out / f"sample_{i:03d}.dcm", prompt=text, seed=seed, study_uid=study_uid,
                                    series_uid=series_uid, instance_number=i + 1)
    (out / "prompt.json").write_text(json.dumps({"text": text, "n": n, "seed": seed, "guidance": synth.default_guidance
                                                 if guidance is None else guidance, "steps": steps or
                                                 synth.default_steps, "temperature": temperature, "synthetic": True}))
    console.print(f"wrote {n} synthetic images to {out}" + (" (PNG + DICOM)" if dicom else ""))


@generate_app.command("edit")
def generate_edit(
    image: Path = typer.Argument(..., help="the source image (PNG/JPEG/DICOM)"),
    text: str = typer.Argument(..., help="the report the edited image should match"),
    ckpt: Path = typer.Option(..., help="a run folder with a trained prior"),
    strength: float = typer.Option(0.5, help="share (0..1) of the codes re-sampled inside the edit region"),
    mask: Path | None = typer.Option(None, help="PNG whose non-zero pixels are the edit region (default: all)"),
    source_text: str | None = typer.Option(None, help="the source image's own report (grounds its encoding)"),
    guidance: float | None = typer.Option(None, help="classifier-free guidance scale"),
    steps: int | None = typer.Option(None, help="masked prior: decoding steps per level"),
    seed: int = typer.Option(0, help="the same seed gives the same edit"),
    out: Path = typer.Option(Path("edited.png"), help="output PNG; the difference map goes to <out>_diff.png"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Counterfactual edit: encode, re-mask a share of the codes (inside --mask), re-sample under TEXT."""
    from medunifier.data.images import ImageLoadError, save_png

    if not 0.0 <= strength <= 1.0:
        _fail(f"--strength must be in [0, 1], got {strength}")
    synth = _synthesizer(ckpt, device)
    try:
        edited, diff = synth.edit_image(image, text, strength=strength, mask=mask, seed=seed, guidance=guidance,
                                        steps=steps, source_text=source_text)
    except (ImageLoadError, FileNotFoundError) as err:
        _fail(str(err))
    save_png(edited, out)
    diff_path = out.with_name(f"{out.stem}_diff.png")
    save_png(diff, diff_path)
    console.print(f"wrote {out} (synthetic edit) and the difference map {diff_path} "
                  f"(mean |difference| {diff.mean() / 255:.4f})")


@generate_app.command("reconstruct")
def generate_reconstruct(
    image: Path = typer.Argument(..., help="the image (PNG/JPEG/DICOM)"),
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    text: str | None = typer.Option(None, help="its report (grounds the bottom codes; default: empty)"),
    out: Path = typer.Option(Path("reconstruction.png"), help="output PNG"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Image -> VQ codes -> image (no prior needed); prints the PSNR to the input."""

    from medunifier.data.images import ImageLoadError, as_array, resize_array, save_png, to_tensor
    from medunifier.generate.sampling import grey_uint8
    from medunifier.generate.train_prior import model_dir_of
    from medunifier.model import load_model
    from medunifier.utils import psnr_db

    try:
        model = load_model(model_dir_of(ckpt), device)
        arr = as_array(image)
    except (FileNotFoundError, ValueError, ImageLoadError) as err:
        _fail(str(err))
    c = model.config.image
    pixels = to_tensor(arr, c.size, c.channels, c.mean, c.std)[None].to(next(model.parameters()).device)
    tokens = model.tokenize([text]) if text else {"input_ids": None, "attention_mask": None}
    recon = grey_uint8(model.reconstruct(pixels, tokens["input_ids"], tokens["attention_mask"])[0], c.mean, c.std)
    save_png(recon, out)
    grey = arr if arr.ndim == 2 else arr.mean(-1)
    mse = float(((recon / 255.0 - resize_array(grey, c.size)) ** 2).mean())
    console.print(f"wrote {out}: PSNR {psnr_db(mse):.2f} dB to the input at {c.size}x{c.size}")


def _image_to_image(ckpt: Path, device: str | None):
    from medunifier.generate.i2i import ImageToImage

    try:
        return ImageToImage.from_run(ckpt, device=device)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))


def _i2i_input(image: Path):
    from medunifier.data.images import ImageLoadError, load_image

    try:
        return load_image(image)
    except (ImageLoadError, FileNotFoundError) as err:
        _fail(str(err))


@generate_app.command("translate")
def generate_translate(
    image: Path = typer.Argument(..., help="the source image (PNG/JPEG/DICOM)"),
    to: str = typer.Option(..., "--to", help="target kind: soft_tissue (bone-suppressed), bone (dual-energy bone "
                           "image), or an MRI contrast t1, t2, pd"),
    ckpt: Path = typer.Option(..., help="a run with an image-to-image head"),
    out: Path = typer.Option(Path("translated.png"), help="output PNG"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Modality translation: the source image as another image type of the same patient."""
    from medunifier.data.images import save_png
    from medunifier.generate.i2i import instruction_for

    try:
        instruction_for("translate", to=to)
    except ValueError as err:
        _fail(str(err))
    runner = _image_to_image(ckpt, device)
    result = runner.translate(_i2i_input(image), to)
    save_png(result, out)
    console.print(f"wrote {out} ({runner.size}x{runner.size}, synthetic: translated to {to})")


@generate_app.command("upscale")
def generate_upscale(
    image: Path = typer.Argument(..., help="the low-resolution image (S/scale pixels for a model of S pixels)"),
    scale: int = typer.Option(4, help="upscaling factor: 2 or 4"),
    ckpt: Path = typer.Option(..., help="a run with an image-to-image head"),
    out: Path = typer.Option(Path("upscaled.png"), help="output PNG"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Super-resolution: an (S/scale)-pixel image to S x S."""
    from medunifier.data.images import save_png
    from medunifier.generate.i2i import instruction_for

    try:
        instruction_for("upscale", scale=scale)
    except ValueError as err:
        _fail(str(err))
    runner = _image_to_image(ckpt, device)
    try:
        result = runner.upscale(_i2i_input(image), scale)
    except ValueError as err:
        _fail(str(err))
    save_png(result, out)
    console.print(f"wrote {out} ({runner.size}x{runner.size}, synthetic: upscaled x{scale})")


@generate_app.command("segment")
def generate_segment(
    image: Path = typer.Argument(..., help="the image (PNG/JPEG/DICOM)"),
    finding: str = typer.Option(..., help="heart (or cardiomegaly), pleural_effusion, pneumothorax, consolidation, "
                                "nodule"),
    ckpt: Path = typer.Option(..., help="a run with an image-to-image head"),
    out: Path = typer.Option(Path("mask.png"), help="output PNG (255 inside the mask)"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Finding mask: the region of FINDING in the image (probability >= 0.5)."""
    import numpy as np

    from medunifier.data.images import save_png
    from medunifier.generate.i2i import instruction_for

    try:
        instruction_for("segment", finding=finding)
    except ValueError as err:
        _fail(str(err))
    runner = _image_to_image(ckpt, device)
    mask, _ = runner.segment(_i2i_input(image), finding)
    save_png(mask.astype(np.uint8) * 255, out)
    console.print(f"wrote {out}: {finding} mask covering {mask.mean():.1%} of the image")


# ------------------------------------------------------------------------------------- top level


@app.command("pretrain")
def pretrain(
    config: str = typer.Option("tiny", help="preset name (tiny, base, paper, ...) or a YAML file"),
    data: Path = typer.Option(..., help="a manifest.jsonl or a folder of shards"),
    out: Path = typer.Option(..., help="run folder (config, checkpoints, metrics, samples)"),
    max_steps: int | None = typer.Option(
        None, help="stop this invocation after this many optimiser steps (the learning-rate schedule and "
        "the curriculum still span train.max_steps / the stages; continue later with --resume)"),
    resume: bool = typer.Option(False, help="continue from the newest intact checkpoint in --out (a damaged "
                                "newer one is moved aside to step-N.damaged)"),
    resume_from: Path | None = typer.Option(None, help="continue from this checkpoint folder "
                                            "(RUN/checkpoints/step-N)"),
    overrides: list[str] | None = typer.Argument(None, help="config overrides such as train.lr=3e-4"),
) -> None:
    """Pre-train MedUnifier (ITC, ITM, ITG, TIG) with Hugging Face Accelerate; resumable.

    Several processes: `torchrun --nproc_per_node N -m medunifier.cli pretrain ...`. SIGINT/SIGTERM
    save a checkpoint and exit 0.
    """
    from medunifier.config import ConfigError
    from medunifier.generate.prior_stage import pretrain as pretrain_run
    from medunifier.train.loop import DataError, NonFiniteLossError

    try:
        result = pretrain_run(config, data, out, max_steps=max_steps, resume=resume, overrides=overrides or [],
                              resume_from=resume_from)
    except (ConfigError, DataError, FileNotFoundError) as err:
        _fail(str(err))
    except NonFiniteLossError as err:
        _fail(str(err), 1)
    if not result.is_main:
        return
    if result.interrupted:
        console.print(f"interrupted at step {result.step}; checkpoint {result.checkpoint}")
        return
    console.print(f"done: step {result.step} ({result.samples_per_s:.1f} samples/s), model in {result.model_dir}, "
                  f"run folder {result.run_dir}")


@app.command("pretrain-vision")
def pretrain_vision_cmd(
    data: Path = typer.Option(..., help="a manifest.jsonl (its train split is used)"),
    out: Path = typer.Option(..., help="folder for the backbone (a Hugging Face folder); the run goes in OUT/stage0"),
    config: str | None = typer.Option(None, help="a stage-0 YAML file (default: the built-in tiny stage 0)"),
    resume: bool = typer.Option(False, help="continue from the last checkpoint in OUT/stage0"),
    evaluate: bool = typer.Option(True, "--eval/--no-eval",
                                  help="after training: linear probe (and zero-shot for image-text runs) on the "
                                  "manifest's 5x200 set, when it has one"),
    overrides: list[str] | None = typer.Argument(None, help="overrides such as objective=image max_steps=500"),
) -> None:
    """Stage 0: pre-train the vision backbone that `pretrain` then freezes (vision.pretrained=OUT).

    Objectives: image-report contrast against a locked pretrained text encoder (objective=text, default),
    augmented-view contrast for sources without reports (objective=image), or both. Several processes:
    `torchrun --nproc_per_node N -m medunifier.cli pretrain-vision ...`.
    """
    from medunifier.config import ConfigError, load_stage0_config
    from medunifier.eval.stage0 import evaluate_stage0
    from medunifier.train.stage0 import pretrain_vision
    from medunifier.utils import launch_rank_world

    try:
        cfg = load_stage0_config(config, overrides or [])
        result = pretrain_vision(cfg, data, out, resume=resume)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"stage 0: {result.step} steps in {result.seconds / 60:.1f} min; backbone in {result.out_dir} "
                  f"(use vision.pretrained={result.out_dir})")
    five = data.parent / "manifest_5x200.jsonl"
    if evaluate and five.exists() and launch_rank_world()[0] == 0:
        results = evaluate_stage0(out, data, five)
        console.print_json(json.dumps(results))


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
        _fail(f"--dtype must be float16, bfloat16 or float32, not {dtype!r}")
    if shard_size < 1:
        _fail("--shard-size must be at least 1")
    try:
        cfg = load_config(config, [*(overrides or []), f"vision.pretrained={vision}", "vision.frozen=true",
                                   "vision.feature_cache=null"])
        summary = write_feature_cache(cfg, data, out, shard_size=shard_size, dtype=dtype, splits=split or None)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    console.print(f"wrote {summary['entries']} feature entries in {summary['shards']} shards to {out} "
                  f"({summary['seconds']:.0f} s); use vision.feature_cache={out}")


# ------------------------------------------------------------------------- serving (report, classify, index)


def _load_copilot(ckpt: Path, device: str | None, index: Path | None = None, generator: str | None = "auto"):
    from medunifier.serve.api import Copilot

    try:
        return Copilot.from_pretrained(ckpt, index=index, device=device, generator=generator)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(str(err))


def _read_inputs(copilot, images: list[Path]) -> list:
    from medunifier.data.images import ImageLoadError

    arrays = []
    for path in images:
        try:
            arrays.append(copilot.to_array(path))
        except (ImageLoadError, ValueError) as err:
            _fail(str(err))
    return arrays


@app.command("report")
def report_cmd(
    images: list[Path] = typer.Argument(..., help="PNG, JPEG or DICOM files"),
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    as_json: bool = typer.Option(False, "--json", help="print JSON: [{image, report}]"),
    num_beams: int = typer.Option(3, help="beam width"),
    max_length: int | None = typer.Option(None, help="maximum generated tokens (default: the model's)"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Draft a report for each image (a machine draft for a radiologist to review)."""
    if num_beams < 1 or batch_size < 1:
        _fail("--num-beams and --batch-size must be at least 1")
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


@app.command("classify")
def classify_cmd(
    images: list[Path] = typer.Argument(..., help="PNG, JPEG or DICOM files"),
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    labels: str | None = typer.Option(None, help="comma-separated labels or prompts (default: the five "
                                      "competition findings); known findings use the shipped prompt ensembles"),
    prompts: str = typer.Option("chexpert5", help="prompt YAML file or shipped set for known finding names"),
    ensemble: str = typer.Option("mean", help="prompt ensembling: mean, max or embedding"),
    as_json: bool = typer.Option(False, "--json", help="print JSON: [{image, probabilities, top}]"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Zero-shot classification: probability of each label for each image."""
    from medunifier.serve.api import Copilot

    if ensemble not in ("mean", "max", "embedding"):
        _fail(f"--ensemble must be mean, max or embedding, got {ensemble}")
    names = _csv(labels)
    if names is not None and not names:
        _fail("--labels is empty")
    try:
        copilot = Copilot.from_pretrained(ckpt, device=device, prompts=prompts, generator=None)
        arrays = _read_inputs(copilot, images)
        results = copilot.classify(arrays, names, ensemble=ensemble)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        _fail(str(err))
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


@app.command("ask")
def ask_cmd(
    image: Path = typer.Argument(..., help="a PNG, JPEG or DICOM file"),
    question: str = typer.Argument(..., help='the question, e.g. "Is there a pleural effusion?"'),
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    candidates: str | None = typer.Option(None, help="comma-separated answers to choose from (e.g. yes,no): "
                                          "each is scored by its log-likelihood; default: a generated answer"),
    max_length: int = typer.Option(16, help="maximum generated answer tokens"),
    num_beams: int = typer.Option(1, help="beam width of a generated answer"),
    as_json: bool = typer.Option(False, "--json", help="print JSON: {image, question, answer, candidates}"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Answer a question about an image (and print each candidate's score with --candidates)."""
    options = _csv(candidates)
    if options is not None and not options:
        _fail("--candidates is empty")
    if max_length < 1 or num_beams < 1:
        _fail("--max-length and --num-beams must be at least 1")
    copilot = _load_copilot(ckpt, device, generator=None)
    array = _read_inputs(copilot, [image])[0]
    try:
        result = copilot.ask(array, question, candidates=options, max_length=max_length, num_beams=num_beams)
    except ValueError as err:
        _fail(str(err))
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
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    data: Path = typer.Option(..., help="a manifest.jsonl (records with an image are indexed)"),
    out: Path = typer.Option(..., help="index folder: embeddings.safetensors + index.json"),
    split: str | None = typer.Option(None, help="index only this split of a multi-split manifest"),
    batch_size: int = typer.Option(64, help="images per forward pass"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """Embed a manifest's cases (images and reports) for similar-case retrieval."""
    import time

    from medunifier.serve.api import model_checksum, resolve_model_dir
    from medunifier.serve.index import build_index

    copilot = _load_copilot(ckpt, device, generator=None)
    model_dir = resolve_model_dir(ckpt).resolve()
    start = time.perf_counter()
    try:
        index = build_index(copilot.model, data, out, split=split, batch_size=batch_size,
                            model_meta={"dir": str(model_dir), "checksum": model_checksum(model_dir)})
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
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
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
) -> None:
    """The k indexed cases most similar to an image or a text (cosine similarity)."""
    from medunifier.serve.index import EmbeddingIndex

    if (image is None) == (text is None):
        _fail("give exactly one of --image and --text")
    if k < 1:
        _fail("-k must be at least 1")
    if mode not in ("auto", "text", "image"):
        _fail(f"--mode must be auto, text or image, got {mode}")
    try:
        idx = EmbeddingIndex.load(index)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    model_dir = ckpt or (idx.meta.get("model") or {}).get("dir")
    if model_dir is None:
        _fail(f"{index} does not record its model: pass --ckpt")
    copilot = _load_copilot(Path(model_dir), device, generator=None)
    try:
        copilot.set_index(idx)
        query = text if text is not None else copilot.to_array(image)
        hits = copilot.retrieve(query, k=k, mode=mode)
    except (ValueError, RuntimeError) as err:
        _fail(str(err))
    if as_json:
        print(json.dumps([h.to_dict() for h in hits], indent=2))
        return
    table = Table(title=f"{len(hits)} most similar of {len(idx)} cases")
    for col in ("rank", "score", "id", "image", "text"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left")
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.3f}", h.id, h.image or "", h.text[:100])
    console.print(table)


@app.command("serve")
def serve(
    ckpt: Path = typer.Option(..., help="a run folder or a saved model folder"),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(8000, help="TCP port"),
    token_file: Path | None = typer.Option(None, help="file whose first line is the bearer token clients must send"),
    index: Path | None = typer.Option(None, help="an index folder for similar-case retrieval"),
    settings: Path | None = typer.Option(None, help="YAML/JSON file of limits (see medunifier.serve.settings)"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
    threads: int | None = typer.Option(None, help="torch intra-op threads (default: torch's choice)"),
    overrides: list[str] | None = typer.Argument(None, help="limit overrides such as max_upload_bytes=5000000"),
) -> None:
    """Serve a trained model over REST (FastAPI) with the web co-pilot page at /."""
    import logging

    import torch
    import uvicorn

    from medunifier.serve.app import create_app
    from medunifier.serve.settings import SettingsError, is_loopback, load_settings

    try:
        limits = load_settings(settings, overrides or [], token_file)
    except SettingsError as err:
        _fail(str(err))
    loopback = is_loopback(host)
    if not loopback and limits.token is None:
        console.print(f"[yellow]warning:[/yellow] binding to {host} without --token-file: anyone who can reach "
                      "this port can use the model")
    if not loopback and limits.allowed_hosts is None:
        console.print(f"[yellow]note:[/yellow] binding to {host}: any Host header is accepted; list the names "
                      "clients use in allowed_hosts (settings) to refuse DNS-rebinding requests")
    if threads is not None:
        if threads < 1:
            _fail("--threads must be at least 1")
        torch.set_num_threads(threads)
    copilot = _load_copilot(ckpt, device, index=index)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not copilot.can_generate:
        console.print(f"[yellow]note:[/yellow] synthesis and editing are off ({copilot.generation_reason})")
    console.print(f"serving {copilot.model_dir} ({copilot.checksum}) on http://{host}:{port}/ "
                  + (f"with {len(copilot.index)} indexed cases" if copilot.index is not None else "without an index"))
    uvicorn.run(create_app(copilot, limits, bind_host=host), host=host, port=port, log_level="info", workers=1)


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="output folder"),
    steps: int | None = typer.Option(None, help="stage-1 steps (the image-text encoder and generator; default 640)"),
    stage0_steps: int | None = typer.Option(None, help="stage-0 steps (the vision backbone; default 480)"),
    prior_steps: int | None = typer.Option(None, help="steps of the code priors (default 270)"),
    minutes: float | None = typer.Option(None, help="fit stage 1 to this wall-clock budget on this machine instead "
                                         "of a step count (the figures then depend on the machine's speed and load)"),
    stage0_minutes: float | None = typer.Option(None, help="the same for stage 0 (report embeddings included)"),
    prior_minutes: float | None = typer.Option(None, help="the same for the code priors"),
    n_images: int = typer.Option(6000, help="SynthCXR images to generate (plus the 5x200 set)"),
) -> None:
    """The whole system on a CPU in minutes: SynthCXR, stage 0, the frozen-encoder model, priors, evaluation,
    an HTML report. Fixed step counts by default (about 20 minutes on 2 cores), so the figures do not depend
    on the machine's load."""
    from medunifier.demo import demo_budgets, run_demo

    budgets = dict(steps=steps, stage0_steps=stage0_steps, prior_steps=prior_steps, minutes=minutes,
                   stage0_minutes=stage0_minutes, prior_minutes=prior_minutes)
    try:
        demo_budgets(**budgets)
    except ValueError as err:
        _fail(str(err))
    run_demo(out, n_images=n_images, **budgets)


# ------------------------------------------------------------------------------------------- config


@config_app.command("show")
def config_show_cmd(
    preset: str = typer.Argument("tiny", help="preset name (tiny, base, paper, ...) or a YAML file"),
    overrides: list[str] | None = typer.Argument(None, help="config overrides such as train.lr=3e-4"),
    stage0: bool = typer.Option(False, "--stage0", help="PRESET is a stage-0 YAML file ('default' for the "
                                "built-in stage 0), as `pretrain-vision --config` takes"),
) -> None:
    """Every field of a validated config: its value and what it means."""
    from medunifier.config import ConfigError, describe_fields, load_config, load_stage0_config

    try:
        if stage0:
            cfg = load_stage0_config(None if preset == "default" else preset, overrides or [])
        else:
            cfg = load_config(preset, overrides or [])
    except ConfigError as err:
        _fail(str(err))
    table = Table(title=f"{cfg.name}", show_lines=False)
    for column in ("field", "value", "description"):
        table.add_column(column, overflow="fold")
    for key, value, description in describe_fields(cfg):
        table.add_row(key, json.dumps(value), description)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
