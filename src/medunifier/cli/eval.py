"""`medunifier eval`: the evaluators of a trained run (retrieval, zero-shot, fine-tuning, report generation, VQA,
synthesis, editing, image-to-image) and the training ablations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from medunifier.cli.common import (
    DeviceOption,
    GuidanceOption,
    ModelOption,
    PriorRunOption,
    PriorStepsOption,
    console,
    csv_list,
    fail,
    fail_on,
)

if TYPE_CHECKING:
    from medunifier.eval.ablation import StudySettings

__all__ = ["eval_app"]

eval_app = typer.Typer(help="Evaluate a trained run: retrieval, zero-shot, fine-tuning, report generation, "
                       "VQA, synthesis, ablation.", no_args_is_help=True)


def _eval_out(out: Path | None, ckpt: Path, name: str) -> Path:
    return out if out is not None else Path(ckpt) / "eval" / name


_EVAL_ERRORS = (FileNotFoundError, ValueError, ImportError)


@eval_app.command("retrieval")
def eval_retrieval(
    ckpt: ModelOption,
    data: Path = typer.Option(..., help="a 5x200-style manifest (one positive finding per image)"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/retrieval)"),
    classes: str | None = typer.Option(None, help="comma-separated classes (default: the five competition findings)"),
    k: str = typer.Option("1,5,10", help="comma-separated K values"),
    split: str | None = typer.Option(None, help="keep this split of a multi-split manifest"),
    batch_size: int = typer.Option(64, help="images per forward pass"),
    device: DeviceOption = None,
    rerank: int = typer.Option(0, min=0, help="re-rank each query's top K ITC candidates by ITM, as BLIP-2 "
                               "retrieves (0 = ITC only; the ITC-only figures are kept in results.json)"),
) -> None:
    """Image-to-text and text-to-image retrieval: mAP@K (PRIOR/CXR-CLIP), Recall@K, mean rank."""
    from medunifier.eval.retrieval import run_retrieval

    with fail_on(*_EVAL_ERRORS):
        run_retrieval(ckpt, data, _eval_out(out, ckpt, "retrieval"), classes=csv_list(classes),
                      ks=[int(x) for x in csv_list(k)], split=split, batch_size=batch_size, device=device, console=console,
                      rerank=rerank)


@eval_app.command("zeroshot")
def eval_zeroshot(
    ckpt: ModelOption,
    data: Path = typer.Option(..., help="a labelled manifest"),
    prompts: str = typer.Option("chexpert5", help="prompt YAML file, or a shipped set: chexpert5, pneumonia"),
    ensemble: str = typer.Option("mean", help="prompt ensembling: mean, max or embedding"),
    seed: int | None = typer.Option(None, help="prompt sampling seed (default: the file's)"),
    max_prompts: int | None = typer.Option(None, help="prompts per class (default: the file's)"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/zeroshot)"),
    split: str | None = typer.Option(None, help="keep this split of a multi-split manifest"),
    batch_size: int = typer.Option(64, help="images per forward pass"),
    device: DeviceOption = None,
) -> None:
    """Zero-shot classification with GLoRIA-style prompt ensembles: accuracy, macro-F1, AUROC."""
    from medunifier.eval.zeroshot import run_zeroshot

    if ensemble not in ("mean", "max", "embedding"):
        fail(f"--ensemble must be mean, max or embedding, got {ensemble}")
    with fail_on(*_EVAL_ERRORS):
        run_zeroshot(ckpt, data, prompts, _eval_out(out, ckpt, "zeroshot"), ensemble=ensemble, seed=seed,
                     max_prompts=max_prompts, split=split, batch_size=batch_size, device=device, console=console)


@eval_app.command("finetune")
def eval_finetune(
    ckpt: ModelOption,
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
    device: DeviceOption = None,
) -> None:
    """Linear-probe or full fine-tuning at label fractions; AUROC (binary) or accuracy; mean/std over seeds."""
    from medunifier.eval.finetune import run_finetune

    if mode not in ("linear", "full"):
        fail(f"--mode must be linear or full, got {mode}")
    name = f"finetune_{mode}" + ("_scratch" if from_scratch else "")
    with fail_on(*_EVAL_ERRORS):
        run_finetune(ckpt, train, val, test, _eval_out(out, ckpt, name), fractions=[float(f) for f in csv_list(fractions)],
                     seeds=seeds, mode=mode, from_scratch=from_scratch, classes=csv_list(classes), epochs=epochs, lr=lr,
                     batch_size=batch_size, device=device, console=console, holdout=holdout)


@eval_app.command("report")
def eval_report(
    ckpt: ModelOption,
    data: Path = typer.Option(..., help="a manifest of images with reports"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/report)"),
    split: str | None = typer.Option(None, help="keep this split of a multi-split manifest"),
    target: str = typer.Option("text", help="reference field: text, findings or impression"),
    num_beams: int = typer.Option(3, help="beam width"),
    max_length: int = typer.Option(95, help="maximum generated tokens"),
    repetition_penalty: float = typer.Option(1.0, help="CTRL-style repetition penalty (1 = off)"),
    no_repeat_ngram_size: int = typer.Option(3, help="block repeated n-grams (3 = R2Gen's trigram blocking)"),
    candidates: int = typer.Option(1, min=1, help="draft this many reports per image (the beam-search one and "
                                   "nucleus samples) and keep the one the model's ITM + ITC + likelihood score highest"),
    seed: int = typer.Option(0, help="seed of the candidates' nucleus samples"),
    limit: int | None = typer.Option(None, help="score only the first N images"),
    meteor: bool = typer.Option(True, help="compute METEOR (runs Java)"),
    round_trip_refs: bool = typer.Option(True, help="score references decoded from their tokens, as R2Gen does"),
    batch_size: int = typer.Option(16, help="images per generation batch"),
    device: DeviceOption = None,
) -> None:
    """Report generation: BLEU-1..4, METEOR, ROUGE-L (R2Gen) and clinical efficacy (labeler P/R/F1)."""
    from medunifier.eval.report import run_report

    if target not in ("text", "findings", "impression"):
        fail(f"--target must be text, findings or impression, got {target}")
    with fail_on(*_EVAL_ERRORS):
        run_report(ckpt, data, _eval_out(out, ckpt, "report"), split=split, target=target, num_beams=num_beams,
                   max_length=max_length, repetition_penalty=repetition_penalty,
                   no_repeat_ngram_size=no_repeat_ngram_size, candidates=candidates, seed=seed, limit=limit,
                   meteor=None if meteor else False,
                   round_trip_refs=round_trip_refs, batch_size=batch_size, device=device, console=console)


@eval_app.command("vqa")
def eval_vqa(
    ckpt: ModelOption,
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
    closed_calibration: str = typer.Option("none", help="closed answers: none (the likeliest candidate) or "
                                           "image-pmi (the candidate this image makes likelier than the reference "
                                           "training images do on average)"),
    reference_images: int = typer.Option(8, help="--closed-calibration image-pmi: training images averaged over"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/vqa)"),
    limit: int | None = typer.Option(None, help="answer only the first N questions"),
    max_length: int = typer.Option(16, help="maximum generated answer tokens"),
    num_beams: int = typer.Option(1, help="beam width of open answers (1: greedy, the training layout exactly)"),
    batch_size: int = typer.Option(32, help="questions per forward pass"),
    device: DeviceOption = None,
) -> None:
    """Visual question answering: closed, open and overall accuracy (+ open token recall), by modality and organ."""
    from medunifier.eval.vqa import run_vqa

    if closed_scoring not in ("likelihood", "generate"):
        fail(f"--closed-scoring must be likelihood or generate, got {closed_scoring}")
    if open_scoring not in ("generate", "rank"):
        fail(f"--open-scoring must be generate or rank, got {open_scoring}")
    if top_k < 0:
        fail("--top-k must be 0 (the whole answer list) or more")
    if closed_calibration not in ("none", "image-pmi"):
        fail(f"--closed-calibration must be none or image-pmi, got {closed_calibration}")
    if closed_calibration == "image-pmi" and (closed_scoring != "likelihood" or reference_images < 1):
        fail("--closed-calibration image-pmi needs --closed-scoring likelihood and --reference-images >= 1")
    if min(max_length, num_beams, batch_size) < 1 or (limit is not None and limit < 1):
        fail("--max-length, --num-beams, --batch-size and --limit must be at least 1")
    with fail_on(*_EVAL_ERRORS):
        run_vqa(ckpt, data, _eval_out(out, ckpt, "vqa"), split=split, device=device, closed_scoring=closed_scoring,
                open_scoring=open_scoring, top_k=top_k or None, shuffle_images=shuffle_images,
                closed_calibration=closed_calibration, reference_images=reference_images,
                limit=limit, max_length=max_length, num_beams=num_beams, batch_size=batch_size, console=console)


# The options of the training studies (ablation, experts), declared once: `resume: ResumeOption = False`.
PresetOption = Annotated[str, typer.Option(help="preset name or YAML file")]
SeedsOption = Annotated[int, typer.Option(help="number of seeds (0..n-1), the same for every run")]
RunStepsOption = Annotated[int, typer.Option(help="training steps of every run")]
ResumeOption = Annotated[bool, typer.Option(help="reuse finished runs and resume interrupted ones in --out")]
EvalBatchOption = Annotated[int, typer.Option(help="evaluation batch size")]
EvalDeviceOption = Annotated[str | None, typer.Option(help="evaluation device (default: cuda when available)")]
OverridesArgument = Annotated[list[str] | None, typer.Argument(help="config overrides such as train.batch_size=16")]


def _study(seeds: int, steps: int, eval_data: Path | None, prompts: str, overrides: list[str] | None, resume: bool,
           batch_size: int, device: str | None) -> StudySettings:
    """The studies' shared settings from their options (bad values exit with the error)."""
    from medunifier.eval.ablation import StudySettings

    with fail_on(ValueError):
        return StudySettings(seeds=seeds, steps=steps, eval_data=eval_data, prompts=prompts,
                             overrides=overrides or None, resume=resume, batch_size=batch_size, device=device)


@eval_app.command("ablation")
def eval_ablation(
    config: PresetOption = "tiny",
    data: Path = typer.Option(..., help="training manifest with train/val/test splits"),
    objectives: str = typer.Option("itc,itc+itm,itc+itm+itg,itc+itm+tig,all", help="comma-separated objective sets"),
    seeds: SeedsOption = 3,
    steps: RunStepsOption = ...,
    eval_data: Path | None = typer.Option(None, help="retrieval / zero-shot manifest (default: the test split of --data)"),
    prompts: str = typer.Option("chexpert5", help="prompt set for zero-shot (its classes are used everywhere)"),
    fractions: str = typer.Option("0.01,0.1,1.0", help="linear-probe label fractions"),
    out: Path = typer.Option(Path("runs/ablation"), help="output folder (one run folder per set and seed)"),
    resume: ResumeOption = False,
    batch_size: EvalBatchOption = 64,
    device: EvalDeviceOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Objective ablation (Table 6): train each objective set per seed, evaluate, print mean ± std."""
    from medunifier.eval.ablation import run_ablation

    study = _study(seeds, steps, eval_data, prompts, overrides, resume, batch_size, device)
    with fail_on(*_EVAL_ERRORS):
        run_ablation(config, data, out, objectives=csv_list(objectives), fractions=[float(f) for f in csv_list(fractions)],
                     study=study, console=console)


@eval_app.command("experts")
def eval_experts(
    config: PresetOption = "tiny",
    data: Path = typer.Option(..., help="training manifest (train/val splits; its train images also train the "
                              "consistency classifier)"),
    seeds: SeedsOption = 3,
    steps: RunStepsOption = ...,
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
    resume: ResumeOption = False,
    batch_size: EvalBatchOption = 64,
    device: EvalDeviceOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Shared vs task experts: the same budget and seeds per variant; understanding, VQA and generation."""
    from medunifier.eval.experts import run_experts_ablation

    study = _study(seeds, steps, eval_data, prompts, overrides, resume, batch_size, device)
    with fail_on(*_EVAL_ERRORS):
        run_experts_ablation(config, data, out=out, variants=csv_list(variants) or [], vqa_data=vqa_data,
                             vqa_split=vqa_split, vqa_objectives=vqa_objectives.split("+"), synthesis=synthesis,
                             prior_steps=prior_steps, n_generated=n_generated, fid=fid, study=study, console=console)


@eval_app.command("synthesis")
def eval_synthesis(
    ckpt: PriorRunOption = ...,
    data: Path = typer.Option(..., help="manifest with train/val/test splits: trains the consistency classifier; "
                              "its normal test images are the edit sources"),
    eval_data: Path | None = typer.Option(None, help="reference images and prompts (default: manifest_5x200.jsonl "
                                           "beside --data, else the test split of --data)"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/synthesis)"),
    prompts_per_finding: int = typer.Option(20, help="prompts (reports) per competition finding"),
    samples_per_prompt: int = typer.Option(2, help="images generated per prompt (>= 2 for diversity)"),
    guidance: GuidanceOption = None,
    steps: PriorStepsOption = None,
    seed: int = typer.Option(0, help="seed of prompt choice, sampling, classifier training"),
    classifier: str = typer.Option("cnn", help="consistency classifier: cnn (pixels, independent of the model) or "
                                   "probe (linear probe on the model's query features)"),
    edits_per_finding: int = typer.Option(10, help="counterfactual edits per finding (0: none)"),
    strength: float = typer.Option(1.0, help="share of the codes re-sampled inside the edit region"),
    fid: bool = typer.Option(True, help="compute Inception FID (the slowest part)"),
    device: DeviceOption = None,
) -> None:
    """Synthesis: FID (Inception + domain) with references, finding consistency, diversity, edit metrics."""
    from medunifier.eval.synthesis import run_synthesis

    if classifier not in ("cnn", "probe"):
        fail(f"--classifier must be cnn or probe, got {classifier}")
    if prompts_per_finding < 1 or samples_per_prompt < 1:
        fail("--prompts-per-finding and --samples-per-prompt must be >= 1")
    with fail_on(*_EVAL_ERRORS):
        run_synthesis(ckpt, data, _eval_out(out, ckpt, "synthesis"), eval_data=eval_data,
                      prompts_per_finding=prompts_per_finding, samples_per_prompt=samples_per_prompt,
                      guidance=guidance, steps=steps, seed=seed, classifier=classifier,
                      edits_per_finding=edits_per_finding, edit_strength=strength, fid=fid, device=device,
                      console=console)


@eval_app.command("edit")
def eval_edit(
    ckpt: PriorRunOption = ...,
    data: Path = typer.Option(..., help="manifest with edit records (medunifier data synth --pairs N); its train "
                              "images train the finding classifier"),
    out: Path | None = typer.Option(None, help="output folder (default <ckpt>/eval/edit)"),
    split: str = typer.Option("test", help="split of the edit records to evaluate"),
    strength: float = typer.Option(0.6, help="share of the codes re-sampled (inside the region)"),
    region: str = typer.Option("mask", help="mask: edit inside each pair's edit_region; none: anywhere"),
    guidance: GuidanceOption = None,
    steps: PriorStepsOption = None,
    seed: int = typer.Option(0, help="seed of the edits and of classifier training"),
    max_pairs: int = typer.Option(200, help="evaluate at most this many pairs"),
    device: DeviceOption = None,
) -> None:
    """Edits against ground truth: SSIM / PSNR of edited sources to their targets, finding flip rate."""
    from medunifier.eval.edit import run_edit_eval

    if region not in ("mask", "none"):
        fail(f"--region must be mask or none, got {region}")
    if not 0.0 <= strength <= 1.0 or max_pairs < 1:
        fail("--strength must be in [0, 1] and --max-pairs >= 1")
    with fail_on(*_EVAL_ERRORS):
        run_edit_eval(ckpt, data, _eval_out(out, ckpt, "edit"), split=split, strength=strength, region=region,
                      guidance=guidance, steps=steps, seed=seed, max_pairs=max_pairs, device=device,
                      console=console)


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
    device: DeviceOption = None,
) -> None:
    """Image-to-image against the truth: PSNR/SSIM beside bicubic (upscale) and the unchanged source
    (translate), Dice/IoU beside an intensity threshold (segment), finding survival through translation."""
    from medunifier.eval.i2i import run_i2i_eval

    if max_per_task < 1:
        fail("--max-per-task must be >= 1")
    with fail_on(*_EVAL_ERRORS):
        run_i2i_eval(ckpt, data, _eval_out(out, ckpt, "i2i"), split=split, max_per_task=max_per_task,
                     survival=survival, seed=seed, device=device, console=console)

