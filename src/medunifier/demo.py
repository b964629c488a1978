"""`medunifier demo`: the whole system on a CPU in minutes.

SynthCXR (64x64) -> stage 0 -> the `tiny_frozen` model on cached features -> priors -> evaluation (retrieval,
zero-shot, report generation, reconstruction) -> `report.html` with the config, loss curves,
codebook usage, real versus reconstructed images, generated reports and every metric table.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console

from medunifier.config import LossWeights, MedUnifierConfig, config_from_dict, load_config, save_config
from medunifier.utils import html_table

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

console = Console()


def _calibrate_step_seconds(config: MedUnifierConfig, losses: list[LossWeights],
                            texts: list[str] | None = None) -> list[float]:
    """Seconds per training step of the model under each set of loss weights (a few real steps each).

    texts: training reports to time with (their length and variety set the cost of the text passes and of
    ITM's hard negatives: one repeated short report timed the all-objective step at 1.67 s where the demo
    then ran it at about 2.5 s); default one fixed report.
    """
    from medunifier.model.medunifier import MedUnifier
    from medunifier.train.precision import autocast

    torch.manual_seed(0)
    model = MedUnifier(config)
    batch_size = config.train.batch_size
    if not texts:
        texts = ["FINDINGS: Mild cardiomegaly. Small left pleural effusion. No pneumothorax. "
                 "IMPRESSION: Cardiomegaly and a small left effusion."]
    texts = [texts[i % len(texts)] for i in range(batch_size)]
    batch = model.tokenize(texts)
    c = config.image
    batch["pixel_values"] = torch.randn(batch_size, c.channels, c.size, c.size)
    batch["ids"] = [str(i) for i in range(batch_size)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    seconds = []
    for weights in losses:
        times = []
        for _ in range(4):
            start = time.perf_counter()
            with autocast(config.train.mixed_precision):  # the precision the run will train in
                loss = model(batch, loss_weights=weights).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        seconds.append(float(np.median(times[1:])))
    return seconds


# The demo's stage 1 trains all four objectives from the first step: on the frozen stage-0 features ITM
# learns (it stayed at its prior while the vision encoder was learned through the Q-Former), and ITC spreads
# its target over same-finding reports (`itc_targets: findings`), mixed 0.6 : 0.4 with stage 0's own
# image-text softmax (`itc_distill`: ALBEF's share; stage 0 aligned the same features to a pretrained text
# encoder, the Q-Former's text side starts from scratch). TIG is weighted 4: its MSE (about 0.02) is small
# beside ITC (about 3).
DEMO_STAGES = [("full", 1.0, LossWeights(itc=1.0, itm=1.0, itg=1.0, tig=4.0))]
DEMO_OVERRIDES = ["itc_targets=findings"]
DEMO_TEACHER_SHARE = 0.4  # itc_distill, wherever the stage-0 run is there to teach
# Reports: 8 drafts per image (beam search and 7 nucleus samples), the one the model's own ITM + ITC + mean
# token log-likelihood score highest is kept (`MedUnifier.generate_report(candidates=...)`): beam search
# alone leans to the normal study and names fewer findings than the image shows.
DEMO_REPORT_CANDIDATES = 8


# The demo's step counts. Fixed counts make its figures a function of the code and the seed, not of the
# machine's speed or load (a wall-clock budget gave stage 0 a quarter fewer steps on a loaded machine, and
# zero-shot fell 0.04). On 2 quiet cores they take about 3.5 + 9 + 4.5 minutes.
DEMO_STEPS = {"stage0": 480, "stage1": 640, "prior": 270}
# Then the decoder is refitted alone on the frozen codes (about 1.5 minutes): stage 1's decoder shares its
# steps with three other objectives, and 600 more steps on the codes raised held-out PSNR by 0.50-0.55 dB on
# four stage-1 runs (`medunifier generate refine-decoder`); the codes, so the priors and understanding, stay.
DEMO_DECODER_STEPS = 600

# With a wall-clock budget instead: a few timed steps on a rested machine run faster than the sustained training loop (which also loads
# data, clips gradients, validates and checkpoints): the whole `make demo` must stay under 25 minutes.
# On the frozen-feature path the demo's loop sustained 0.78 s/step where four timed steps gave 0.75:
# a tenth covers it.
CALIBRATION_MARGIN = 1.1
STAGE0_MARGIN = 1.25  # stage 0 sustained 0.31 s/step where three timed steps gave 0.25 (data loading per step)


def demo_config(tokenizer_dir: Path, seed: int, manifest: Path | None = None, vision_dir: Path | None = None,
                feature_cache: Path | None = None, steps: int | None = None,
                minutes: float | None = None) -> MedUnifierConfig:
    """The `tiny_frozen` preset (frozen stage-0 backbone `vision_dir`, its features read from `feature_cache`)
    with the demo's stages, for `steps` optimiser steps, or sized so that training fits in `minutes` here
    (step costs timed on the first training reports of `manifest` when given). Exactly one of the two."""
    if (steps is None) == (minutes is None):
        raise ValueError("demo_config takes either steps or minutes, not both or neither")
    overrides = [f"text.tokenizer={tokenizer_dir}", f"train.seed={seed}", *DEMO_OVERRIDES]
    if vision_dir is not None:
        overrides += [f"vision.pretrained={vision_dir}", f"itc_distill={DEMO_TEACHER_SHARE}"]
    config = load_config("tiny_frozen", overrides)
    if minutes is not None:
        texts = None
        if manifest is not None:
            from medunifier.data.manifest import load_records

            texts = [r.text for r in load_records(manifest, splits=["train"]) if r.text][: config.train.batch_size]
        seconds = _calibrate_step_seconds(config, [losses for _, _, losses in DEMO_STAGES], texts)
        per_step = CALIBRATION_MARGIN * sum(fraction * s for (_, fraction, _), s in zip(DEMO_STAGES, seconds))
        steps = max(50, int(minutes * 60 / per_step))
        console.print("measured " + ", ".join(f"{name} {s:.2f} s/step" for (name, _, _), s in zip(DEMO_STAGES, seconds))
                      + f" at batch {config.train.batch_size}: {steps} steps fit in {minutes:g} minutes")
    assert steps is not None
    data = config.to_dict()
    data["vision"]["feature_cache"] = str(feature_cache) if feature_cache is not None else None
    data["train"].update(max_steps=steps, save_every=max(steps // 4, 50), val_every=max(steps // 4, 50),
                         stages=[{"name": name, "fraction": fraction, "losses": losses.model_dump()}
                                 for name, fraction, losses in DEMO_STAGES])
    return config_from_dict(data, "<demo config>")


def run_stage0(data_dir: Path, out: Path, seed: int, steps: int | None = None,
               minutes: float | None = None) -> dict[str, Any]:
    """Stage 0 for `steps`, or within `minutes` (report embeddings included): the backbone folder `out`, and its
    probe figures. Exactly one of `steps` and `minutes`."""
    if (steps is None) == (minutes is None):
        raise ValueError("run_stage0 takes either steps or minutes, not both or neither")
    from medunifier.config import load_stage0_config
    from medunifier.data.dataset import ManifestDataset
    from medunifier.eval.stage0 import evaluate_stage0
    from medunifier.model.stage0 import TextTower
    from medunifier.train.stage0 import RUN, TextBank, pretrain_vision, seconds_per_step

    manifest = data_dir / "manifest.jsonl"
    config = load_stage0_config(None, [f"seed={seed}", "soft_targets=true"])
    if not (out / "model.safetensors").exists():
        start = time.perf_counter()
        resume = (out / RUN / "config.json").exists()
        if resume:  # the schedule was sized when stage 0 started: keep it
            config = config.model_validate(json.loads((out / RUN / "config.json").read_text()))
        else:
            (out / RUN).mkdir(parents=True, exist_ok=True)
            dataset = ManifestDataset(manifest, image_size=config.image.size, channels=config.image.channels,
                                      splits=["train"])
            tower = TextTower(config.text_encoder, max_length=config.text_max_length)
            TextBank.build(dataset.records, tower, out / RUN / "text_embeddings.safetensors", config.text_encoder,
                           console.print)  # cached: pretrain_vision reads it back
            if minutes is not None:
                per_step = STAGE0_MARGIN * seconds_per_step(config, tower.width)
                left = minutes * 60 - (time.perf_counter() - start)
                steps = max(100, int(left / per_step))
                console.print(f"stage 0: {per_step / STAGE0_MARGIN:.2f} s/step at batch {config.batch_size}: "
                              f"{steps} steps in the {left / 60:.1f} minutes left")
            else:
                console.print(f"stage 0: {steps} steps at batch {config.batch_size}")
            config = config.model_copy(update={"max_steps": steps, "save_every": max(steps // 4, 50)})
        pretrain_vision(config, manifest, out, resume=resume)
    return evaluate_stage0(out, manifest, data_dir / "manifest_5x200.jsonl")


def demo_budgets(steps: int | None = None, stage0_steps: int | None = None, prior_steps: int | None = None,
                 minutes: float | None = None, stage0_minutes: float | None = None,
                 prior_minutes: float | None = None) -> dict[str, dict[str, Any]]:
    """{"stage0" | "stage1" | "prior": {"steps": n or None, "minutes": m or None}}, one of the two set per stage:
    the stage's step count when given, its time budget when given, else its `DEMO_STEPS` count.

    Raises ValueError when a stage gets both, or a non-positive value.
    """
    chosen: dict[str, dict[str, Any]] = {}
    for name, n, m in (("stage0", stage0_steps, stage0_minutes), ("stage1", steps, minutes),
                       ("prior", prior_steps, prior_minutes)):
        option = "" if name == "stage1" else f"{name}-"
        if n is not None and m is not None:
            raise ValueError(f"the demo's {name} takes --{option}steps or --{option}minutes, not both: drop one")
        if n is not None and n < 1:
            raise ValueError(f"--{option}steps must be positive (got {n})")
        if m is not None and m <= 0:
            raise ValueError(f"--{option}minutes must be positive (got {m})")
        chosen[name] = {"steps": DEMO_STEPS[name] if n is None and m is None else n, "minutes": m}
    return chosen


def run_demo(out: str | Path = "runs/demo", n_images: int = 6000, seed: int = 0, eval_limit: int = 200,
             steps: int | None = None, stage0_steps: int | None = None, prior_steps: int | None = None,
             minutes: float | None = None, stage0_minutes: float | None = None,
             prior_minutes: float | None = None, decoder_steps: int = DEMO_DECODER_STEPS) -> Path | None:
    """Run the demo into `out` and return the path of `report.html` (None when a signal stopped training:
    the same call resumes it).

    The paper's recipe: stage 0 pre-trains the vision backbone, its frozen outputs are cached on disk, stage 1
    trains the image-text encoder and the generator on them, and the code priors are trained last.

    Each of the three trainings runs a fixed step count (`stage0_steps`, `steps`, `prior_steps`; defaults
    `DEMO_STEPS`, about 20 minutes in all on 2 cores), so the figures do not depend on this machine's speed or
    load. Giving a stage's `*minutes` instead fits its step count to that wall-clock budget on this machine.
    Giving both for one stage is an error. `decoder_steps` refits the decoder on the frozen codes before the
    priors are trained (0 skips it).
    """
    chosen = demo_budgets(steps, stage0_steps, prior_steps, minutes, stage0_minutes, prior_minutes)
    from medunifier.data.synthcxr import write_synthcxr

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    data_dir = out / "data"
    start = time.perf_counter()
    if not (data_dir / "manifest.jsonl").exists():
        console.rule("1/5 SynthCXR")
        summary = write_synthcxr(data_dir, n=n_images, size=64, seed=seed)
        console.print(f"wrote {summary.get('n', n_images)} images and the 5x200 set to {data_dir}")
    timings["data_s"] = time.perf_counter() - start

    console.rule("2/5 stage 0: the vision backbone")
    vision_dir = out / "vision"
    start = time.perf_counter()
    stage0 = run_stage0(data_dir, vision_dir, seed, **chosen["stage0"])
    console.print("stage 0 (linear probe and zero-shot of the backbone alone, 5x200): " + json.dumps(stage0))
    feature_dir = out / "features"
    if not (feature_dir / "cache.json").exists():
        from medunifier.train.features import write_feature_cache

        write_feature_cache(load_config("tiny_frozen", [f"vision.pretrained={vision_dir}"]), data_dir / "manifest.jsonl",
                            feature_dir)
    timings["stage0_s"] = time.perf_counter() - start

    console.rule("3/5 stage 1: the image-text encoder and the generator on the frozen features")
    # A WordPiece vocabulary fitted to the reports keeps the LM head small (MiniLM's has 30k rows).
    tokenizer_dir = data_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        from medunifier.data.manifest import load_records
        from medunifier.data.tokenizer import train_tokenizer

        train_tokenizer([r.text for r in load_records(data_dir / "manifest.jsonl", splits=["train"])],
                        tokenizer_dir, vocab_size=1000)
    from medunifier.train.loop import train

    run_dir = out / "run"
    resume = (run_dir / "checkpoints").exists() and (run_dir / "config.yaml").exists()
    if resume:  # the schedule was sized when the run started: keep it
        config = load_config(run_dir / "config.yaml")
        console.print(f"resuming the run in {run_dir} ({config.train.max_steps} steps)")
    else:
        config = demo_config(tokenizer_dir, seed, data_dir / "manifest.jsonl", vision_dir, feature_dir,
                             **chosen["stage1"])
    start = time.perf_counter()
    result = train(config, data_dir / "manifest.jsonl", run_dir, resume=resume)
    timings["train_s"] = time.perf_counter() - start
    if result.interrupted:
        console.print(f"training stopped at step {result.step} (checkpoint {result.checkpoint}); run the same "
                      f"`medunifier demo --out {out}` again to resume")
        return None
    model_dir = run_dir / "model"

    console.rule("4/5 the decoder refitted, text-conditioned priors and evaluation")
    from medunifier.demo_generation import demo_generation_section, refine_demo_decoder, train_demo_priors
    from medunifier.model import load_model

    start = time.perf_counter()
    decoder = refine_demo_decoder(run_dir, data_dir / "manifest.jsonl", decoder_steps, seed=seed)
    timings["decoder_s"] = time.perf_counter() - start
    start = time.perf_counter()
    train_demo_priors(run_dir, data_dir / "manifest.jsonl", seed=seed, **chosen["prior"])
    timings["prior_s"] = time.perf_counter() - start

    model = load_model(model_dir)
    results: dict[str, Any] = {"stage0": stage0, "itm": final_itm(run_dir),
                               "train": {"steps": result.step, "samples_per_s": result.samples_per_s,
                                         "seconds": timings["train_s"]},
                               "decoder_refinement": decoder}
    start = time.perf_counter()
    results.update(evaluate_understanding(model, data_dir, out / "eval", eval_limit))
    generation_html, results["synthesis"] = demo_generation_section(run_dir, data_dir, seed=seed)
    timings["eval_s"] = time.perf_counter() - start

    console.rule("5/5 report")
    report = write_report(out, run_dir, model, data_dir, results, timings, generation_html)
    results["timings_s"] = timings
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    console.print(f"\n[bold green]done[/bold green]: open {report}")
    console.print(f"model: {model_dir}   (serve it with: medunifier serve --ckpt {model_dir})")
    return report


def evaluate_understanding(model: MedUnifier, data_dir: Path, out: Path, limit: int) -> dict[str, Any]:
    """The demo's retrieval and zero-shot (5x200), report (best of `DEMO_REPORT_CANDIDATES` drafts) and
    reconstruction figures of `model` on the demo data in `data_dir`, each evaluation written under `out`."""
    from medunifier.eval.report import run_report
    from medunifier.eval.retrieval import run_retrieval
    from medunifier.eval.zeroshot import run_zeroshot

    five = data_dir / "manifest_5x200.jsonl"
    results: dict[str, Any] = {}
    results["retrieval"] = run_retrieval(model, five, out=out / "retrieval")
    results["zeroshot"] = run_zeroshot(model, five, prompts="chexpert5", out=out / "zeroshot")
    results["report"] = run_report(model, data_dir / "manifest.jsonl", out=out / "report", split="test",
                                   candidates=DEMO_REPORT_CANDIDATES, limit=limit)
    results["reconstruction"] = reconstruction_psnr(model, data_dir, limit)
    return results


def _test_batch(model: MedUnifier, data_dir: Path, n: int) -> tuple[torch.Tensor, list[Any]]:
    from medunifier.data.images import load_image, to_tensor
    from medunifier.data.manifest import load_records

    records = [r for r in load_records(data_dir / "manifest.jsonl", splits=["test"]) if r.image][:n]
    c = model.config.image
    pixels = torch.stack([to_tensor(load_image(data_dir / r.image), c.size, c.channels, c.mean, c.std)
                          for r in records])
    return pixels, records


@torch.no_grad()
def reconstruction_psnr(model: MedUnifier, data_dir: Path, n: int) -> dict[str, float]:
    """PSNR of held-out images reconstructed through the VQ codes, grounded on their reports."""
    from medunifier.utils import psnr_normalised as psnr

    pixels, records = _test_batch(model, data_dir, n)
    values = []
    for i in range(0, len(records), 32):
        chunk = pixels[i:i + 32]
        tokens = model.tokenize([r.text for r in records[i:i + 32]])
        recon = model.reconstruct(chunk, tokens["input_ids"], tokens["attention_mask"])
        values.extend(float(psnr(recon[j:j + 1], chunk[j:j + 1], model.config.image.std)) for j in range(len(chunk)))
    return {"psnr_db_mean": float(np.mean(values)), "psnr_db_min": float(np.min(values)), "images": len(values)}


# ------------------------------------------------------------------------------------------ report


def _png_data_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _file_data_uri(path: Path) -> str | None:
    if not path.exists():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _grid(rows: list[list[np.ndarray]], scale: int = 2) -> np.ndarray:
    """Tile uint8 grey images into one array (rows of equal length), with a 2-px gutter."""
    from PIL import Image

    tiles = [[np.asarray(Image.fromarray(t).resize((t.shape[1] * scale, t.shape[0] * scale))) for t in row]
             for row in rows]
    h, w = tiles[0][0].shape[:2]
    gap = 2
    canvas = np.full((len(tiles) * (h + gap) - gap, len(tiles[0]) * (w + gap) - gap), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return canvas


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _metric_tables(results: dict[str, Any]) -> str:
    parts = []
    r = results.get("retrieval", {})
    for direction in ("image_to_text", "text_to_image"):
        block = r.get(direction)
        if isinstance(block, dict):
            rows = [[k, _fmt(v)] for k, v in block.items() if isinstance(v, (int, float))]
            parts.append(html_table(f"Retrieval ({direction.replace('_', ' ')}, 5x200)", ["metric", "value"], rows))
    z = results.get("zeroshot", {})
    if z:
        rows = [[k, _fmt(v)] for k, v in z.items() if isinstance(v, (int, float))]
        parts.append(html_table("Zero-shot classification (5x200)", ["metric", "value"], rows))
    rep = results.get("report", {})
    if rep:
        rows = [[k, _fmt(v)] for k, v in rep.get("nlg", {}).items()]
        ce = rep.get("clinical_efficacy", {})
        for avg in ("micro", "macro"):
            if isinstance(ce.get(avg), dict):
                rows += [[f"CE {avg} {k}", _fmt(v)] for k, v in ce[avg].items()]
        parts.append(html_table("Report generation (test split)", ["metric", "value"], rows))
    rec = results.get("reconstruction", {})
    if rec:
        parts.append(html_table("Reconstruction (held-out test images)", ["metric", "value"],
                            [[k, _fmt(v)] for k, v in rec.items()]))
    return "\n".join(parts)


def final_itm(run_dir: Path, windows: int = 3) -> dict[str, float]:
    """ITM loss and in-batch accuracy over the last `windows` logged training windows of a run."""
    metrics_path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] \
        if metrics_path.exists() else []
    rows = [r for r in rows if r.get("kind", "train") == "train" and "loss_itm" in r][-windows:]
    if not rows:
        return {}
    return {"loss": float(np.mean([r["loss_itm"] for r in rows])),
            "accuracy": float(np.mean([r.get("itm_acc", float("nan")) for r in rows])),
            "prior_loss": float(-(np.log(1 / 3) / 3 + 2 * np.log(2 / 3) / 3)), "steps": rows[-1]["step"]}


def _get(tree: Any, *path: Any) -> Any:
    for key in path:
        if isinstance(tree, dict):
            tree = tree.get(key, tree.get(str(key)) if not isinstance(key, str) else None)
        else:
            return None
    return tree


def headline(results: dict[str, Any]) -> list[list[Any]]:
    """The figures a reader looks for first: [what, value, chance or baseline]."""
    from medunifier.data.findings import COMPETITION_FINDINGS

    rows: list[list[Any]] = []
    zs = _get(results, "zeroshot", "accuracy")
    if zs is not None:
        rows.append(["zero-shot 5-way accuracy (5x200)", zs, "chance 0.20"])
    p1 = _get(results, "retrieval", "image_to_text", "precision_at_k", 1)
    if p1 is not None:
        rows.append(["image-to-text precision@1 (5x200)", p1, "chance 0.20"])
    ce = _get(results, "report", "clinical_efficacy")
    if ce:
        rows.append(["generated reports: clinical-efficacy F1 (micro)", _get(ce, "micro", "f1"), ""])
        named = [c for c in COMPETITION_FINDINGS if (_get(ce, "per_finding", c, "recall") or 0) >= 0.3]
        rows.append(["CheXpert findings named in >= 30% of the reports of images that have them",
                     f"{len(named)} of {len(COMPETITION_FINDINGS)}", ", ".join(named)])
    itm = results.get("itm") or {}
    if itm:
        rows.append(["image-text matching: final loss / in-batch accuracy",
                     f"{itm['loss']:.3f} / {itm['accuracy']:.3f}", f"prior {itm['prior_loss']:.3f} / 0.667"])
    psnr = _get(results, "reconstruction", "psnr_db_mean")
    if psnr is not None:
        refit = results.get("decoder_refinement") or {}
        before, after = refit.get("val_psnr_before"), refit.get("val_psnr_after")
        note = (f"decoder refitted {refit['settings']['steps']} steps: validation {before:.2f} -> {after:.2f} dB"
                if before is not None and after is not None else "")
        rows.append(["held-out reconstruction PSNR (dB)", psnr, note])
    consistency = _get(results, "synthesis", "consistency", "macro")
    if consistency is not None:
        rows.append(["text-to-image finding consistency", consistency, "chance 0.20"])
    probe = _get(results, "stage0", "linear_probe", "accuracy_5way")
    if probe is not None:
        rows.append(["stage-0 backbone alone: linear probe / zero-shot (5x200)",
                     f"{probe:.3f} / {_get(results, 'stage0', 'zeroshot_accuracy') or float('nan'):.3f}", ""])
    return rows


def _codebook_plot(run_dir: Path) -> str | None:
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "codebook_usage_top" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["codebook_usage_top"] for r in rows], label="top codebook usage")
    ax.plot(steps, [r["codebook_usage_bottom"] for r in rows], label="bottom codebook usage")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of codes used in a batch")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@torch.no_grad()
def write_report(out: Path, run_dir: Path, model: MedUnifier, data_dir: Path, results: dict[str, Any],
                 timings: dict[str, float], generation_html: str = "") -> Path:
    from medunifier.data.images import to_uint8

    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else ""
    if not config_text:
        save_config(model.config, out / "config.yaml")
        config_text = (out / "config.yaml").read_text()
    pixels, records = _test_batch(model, data_dir, 8)
    tokens = model.tokenize([r.text for r in records])
    recon = model.reconstruct(pixels, tokens["input_ids"], tokens["attention_mask"])
    c = model.config.image
    real_row = [to_uint8(p, c.mean, c.std) for p in pixels]
    recon_row = [to_uint8(p, c.mean, c.std) for p in recon]
    recon_grid = _png_data_uri(_grid([real_row, recon_row], scale=2))

    reports = model.generate_report(pixels[:4], num_beams=3, no_repeat_ngram_size=3)
    report_rows = "".join(
        f"<tr><td><img src='{_png_data_uri(real_row[i])}' width=128></td><td>{html.escape(records[i].text)}</td>"
        f"<td>{html.escape(reports[i])}</td></tr>"
        for i in range(len(reports))
    )
    loss_curves = _file_data_uri(run_dir / "loss_curves.png")
    codebook = _codebook_plot(run_dir)
    train = results.get("train", {})
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>medunifier demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
pre {{ background: #f6f6f6; padding: 1em; overflow: auto; max-height: 30em; }}
</style></head><body>
<h1>medunifier demo</h1>
<p>SynthCXR 64x64, the paper's recipe at <code>tiny</code> size: a vision backbone pre-trained in stage 0
({timings.get('stage0_s', 0) / 60:.1f} min, report embeddings and feature cache included), then frozen; the
image-text encoder and the generator trained on its cached features for {train.get('steps', '?')} steps
({timings.get('train_s', 0) / 60:.1f} min, {train.get('samples_per_s', 0):.1f} samples/s) on this machine.
Every figure below was computed by this run.</p>
{html_table("What this model achieved", ["measure", "value", "for scale"], [[_fmt(c) for c in row] for row in headline(results)])}
<h2>Loss curves</h2>
{f"<img src='{loss_curves}' style='max-width:100%'>" if loss_curves else "<p>(no loss curve written)</p>"}
<h2>Codebook usage</h2>
{f"<img src='{codebook}'>" if codebook else "<p>(no codebook metrics logged)</p>"}
<h2>Real (top) and reconstructed (bottom) held-out images</h2>
<img src='{recon_grid}'>
<h2>Generated reports</h2>
<table><tr><th>image</th><th>ground truth</th><th>generated (beam 3)</th></tr>{report_rows}</table>
<h2>Text-to-image generation and counterfactual editing</h2>
{generation_html or "<p>(no priors trained)</p>"}
<h2>Metrics</h2>
{_metric_tables(results)}
<h2>Configuration</h2>
<pre>{html.escape(config_text)}</pre>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path
