"""The generation part of `medunifier demo`: train the priors within a budget, then show and measure them.

    prior_dir = train_demo_priors(run_dir, data_dir / "manifest.jsonl", minutes=3)
    html, metrics = demo_generation_section(run_dir, data_dir)

`train_demo_priors` encodes the training images to codes once, times a few real prior steps on this
machine, sizes the schedule to what is left of the budget and trains (stopping with a checkpoint if the
machine turns out slower). A prior folder that already holds a finished prior is reused; an unfinished one
is resumed with its own settings. `demo_generation_section` runs the synthesis evaluation
(`medunifier.eval.synthesis`) and returns an HTML fragment (a grid of generated images per finding prompt,
a reconstruction row, an edit row with source, edit region, edited image and difference map, and the metric
tables) with images inlined as base64 PNG data URIs, plus the metrics as a JSON-able dict.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medunifier.data.findings import COMPETITION_FINDINGS, DISPLAY_NAMES
from medunifier.utils import html_table

# A prior sized for a CPU budget of minutes (the config's defaults are the full-size ones).
DEMO_PRIOR_OVERRIDES = ["width=192", "layers=3", "heads=4", "dropout=0.0", "batch_size=32", "lr=1e-3",
                        "warmup_ratio=0.03", "steps=8", "guidance=3.0"]
CALIBRATION_STEPS = 3
MIN_STEPS = 100  # fewer prior steps than this give noise whatever the budget


def _log(message: str) -> None:
    print(message, flush=True)


def refine_demo_decoder(run_dir: str | Path, manifest: str | Path, steps: int, seed: int = 0) -> dict[str, Any] | None:
    """Refit the run's decoder on its frozen codes for `steps` (0: skip), once: a demo resumed after this stage
    keeps the recorded pass. Returns the pass's record (settings, validation PSNR before and after), or None."""
    from medunifier.generate.refine_decoder import DecoderRefineSettings, refine_decoder, refinement_passes

    if steps < 0:
        raise ValueError(f"decoder steps must be >= 0 (got {steps})")
    passes = refinement_passes(run_dir)
    if passes:
        _log(f"reusing the decoder refitted in {run_dir} ({passes[-1]['settings']['steps']} steps)")
        return passes[-1]
    if steps == 0:
        return None
    result = refine_decoder(run_dir, manifest, DecoderRefineSettings(steps=steps, seed=seed), log=_log)
    return None if result.interrupted else refinement_passes(run_dir)[-1]


def train_demo_priors(run_dir: str | Path, manifest: str | Path, minutes: float | None = None, seed: int = 0,
                      steps: int | None = None) -> Path:
    """Train the run's priors for `steps`, or in about `minutes` of wall time (code encoding included); returns
    the prior folder.

    Args:
        steps: a fixed step count: the prior then does not depend on this machine's speed or load.
        minutes: fit the step count to this wall-clock budget instead (timed on a few real steps).
    """
    if (steps is None) == (minutes is None):
        raise ValueError("train_demo_priors takes either steps or minutes, not both or neither")
    from medunifier.generate.priors import HierarchicalPrior
    from medunifier.generate.train_prior import (
        CODES_NAME,
        CONFIG_NAME,
        TextFeatures,
        batch_indices,
        cached_codes,
        codes_checksum,
        prior_config,
        prior_dir_for,
        prior_settings,
        steps_for_budget,
        train_prior,
    )
    from medunifier.model import load_model
    from medunifier.train.checkpoint import latest_checkpoint
    from medunifier.train.data import resolve_data

    start = time.perf_counter()
    budget = None if minutes is None else max(30.0, minutes * 60.0)
    run_dir = Path(run_dir)
    prior_dir = prior_dir_for(run_dir)
    meta_path = prior_dir / CONFIG_NAME
    if meta_path.exists() and json.loads(meta_path.read_text()).get("finished"):
        _log(f"reusing the finished prior in {prior_dir}")
        return prior_dir
    model_dir = run_dir / "model"
    model = load_model(model_dir)
    latest = latest_checkpoint(prior_dir)
    if latest is not None:  # resume an interrupted demo with the settings it started with
        from medunifier.config import PriorConfigModel

        state = json.loads((latest / "trainer_state.json").read_text())
        settings = PriorConfigModel.model_validate(state["settings"])
        limit = None if budget is None else max(budget - (time.perf_counter() - start), 60.0)
        train_prior(run_dir, manifest, settings=settings, resume=True, time_limit_s=limit, model=model, log=_log)
        return prior_dir

    settings = prior_settings(model.config, [*DEMO_PRIOR_OVERRIDES, f"seed={seed}"])
    source = resolve_data(manifest)
    codes = cached_codes(model, source.train_records, source.path.parent, prior_dir / CODES_NAME,
                         codes_checksum(model), "train", _log)

    text = TextFeatures(model, codes)  # computed once, reused by train_prior
    _log(f"codes and text features of {len(codes)} training images ready after {time.perf_counter() - start:.0f} s")
    if budget is None:
        settings = settings.model_copy(update={"max_steps": steps, "save_every": max(50, steps // 4)})
        _log(f"prior: {steps} steps at batch {settings.batch_size}")
        train_prior(run_dir, manifest, settings=settings, model=model, text_features=text, log=_log)
        return prior_dir

    # time a few real steps of this prior on this machine
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = HierarchicalPrior(prior_config(model.config, settings)).to(device).train()
        optimizer = torch.optim.AdamW(probe.parameters(), lr=settings.lr)
        times = []
        for step in range(CALIBRATION_STEPS + 1):
            t = time.perf_counter()
            index = batch_indices(len(codes), settings.batch_size, step, seed)
            states, mask = text(index)
            loss = probe.loss(codes.top[index].to(device), codes.bottom[index].to(device), states, mask)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - t)
    seconds_per_step = float(np.median(times[1:]))
    del probe, optimizer
    remaining = budget - (time.perf_counter() - start) - 20.0  # validation codes and loss, saving
    steps = steps_for_budget(seconds_per_step * 1.1, remaining, minimum=MIN_STEPS)
    settings = settings.model_copy(update={"max_steps": steps, "save_every": max(50, steps // 4)})
    _log(f"prior: {seconds_per_step:.2f} s/step at batch {settings.batch_size}: {steps} steps for the "
         f"{max(remaining, 0) / 60:.1f} minutes left of {minutes:g}")
    limit = max(remaining, MIN_STEPS * seconds_per_step) * 1.25  # a slower machine stops with a checkpoint
    train_prior(run_dir, manifest, settings=settings, time_limit_s=limit, model=model, text_features=text, log=_log)
    return prior_dir


# ---------------------------------------------------------------------------------------------- html


def _data_uri(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _tile(images: list[np.ndarray], scale: int = 2, gap: int = 2) -> np.ndarray:
    """A row of uint8 images (grey or RGB, same size), enlarged `scale` times (nearest), on white."""
    rgb = [np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im for im in images]
    rgb = [im.repeat(scale, 0).repeat(scale, 1) for im in rgb]
    h, w = rgb[0].shape[:2]
    canvas = np.full((h, len(rgb) * (w + gap) - gap, 3), 255, np.uint8)
    for i, im in enumerate(rgb):
        canvas[:, i * (w + gap) : i * (w + gap) + w] = im
    return canvas


def _overlay(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The image in grey with the edit region tinted red."""
    rgb = np.repeat(image[..., None], 3, -1).astype(np.float32)
    rgb[region] = 0.55 * rgb[region] + 0.45 * np.array([255.0, 40.0, 40.0])
    return rgb.round().astype(np.uint8)


def _heat(diff: np.ndarray) -> np.ndarray:
    """|difference| (uint8) scaled to its peak, as a black-red-yellow heat map."""
    d = diff.astype(np.float32)
    d = d / d.max() if d.max() > 0 else d
    return (np.stack([np.clip(2 * d, 0, 1), np.clip(2 * d - 1, 0, 1), np.zeros_like(d)], -1) * 255).astype(np.uint8)


def _text(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "PASS" if x else "FAIL"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _fmt(x: Any) -> str:
    return html.escape(_text(x))


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    return html_table(title, header, rows, cell=_text)


def _metric_tables(r: dict[str, Any]) -> str:
    parts = []
    cons, real = r["consistency"], r["classifier"]["real_reference"]
    recon = r["classifier"]["reconstruction_reference"]
    rows = [[DISPLAY_NAMES[c], cons["per_finding"].get(c), real["per_finding"].get(c), recon["per_finding"].get(c)]
            for c in COMPETITION_FINDINGS]
    rows.append(["macro (chance 0.20)", cons["macro"], real["macro"], recon["macro"]])
    parts.append(_table(f"Finding consistency ({r['classifier']['kind']} classifier trained on real images, "
                        f"val accuracy {r['classifier']['val_accuracy']:.3f})",
                        ["finding", "generated images", "real reference images",
                         "their VQ reconstructions (decoder ceiling)"], rows))
    fid = r["fid"]
    spaces = [s for s in ("inception", "domain") if s in fid]
    names = {"generated": "generated (prior)", "real_vs_real": "real train images (real vs real)",
             "random_codes": "decoded random codes", "reconstruction": "VQ reconstructions"}
    rows = [[label] + [fid[s][k] for s in spaces] for k, label in names.items()]
    rows.append(["generated closer to real-vs-real than to random"] + [fid[s]["closer_to_real_than_random"]
                                                                       for s in spaces])
    parts.append(_table(f"Fréchet distance to {fid['n_reference']} real reference images (lower is better)",
                        ["image set", *[f"{s} features" for s in spaces]], rows))
    parts.append(_table("Diversity (mean pairwise feature distance between images of one prompt)",
                        ["measure", "value"], [[k.replace("_", " "), v] for k, v in r["diversity"].items()]))
    e = r.get("edits") or {}
    if "n" in e:
        rows = [["edits (normal image -> each finding)", e["n"]], ["share of codes re-sampled in the region",
                e["strength"]], ["region share of the image", e["region_fraction"]],
                ["flip rate (classifier now says the requested finding)", e["flip_rate"]],
                ["SSIM outside the region, to the source image", e["ssim_outside_source"]],
                ["SSIM outside the region, to the source's reconstruction", e["ssim_outside_reconstruction"]],
                ["SSIM of the unedited reconstruction to the source (VQ ceiling)",
                 e["ssim_outside_source_unedited_reconstruction"]]]
        rows += [[f"flip rate: {DISPLAY_NAMES.get(k, k)}", v] for k, v in e["flip_rate_per_finding"].items()]
        parts.append(_table("Counterfactual edits", ["measure", "value"], rows))
    parts.append(_table("Targets", ["target", "result"], [[k, v] for k, v in r["targets"].items()]))
    t = r["timings"]
    parts.append(_table("Timings", ["step", "seconds"], [[k, v] for k, v in t.items()]))
    return "\n".join(parts)


def _edit_row(edit: dict[str, Any]) -> str:
    """One table row: finding and prompt; source, region overlay, edited image, difference heat map."""
    diff = np.abs(edit["edited"].astype(np.int16) - edit["reconstruction"].astype(np.int16)).astype(np.uint8)
    strip = _tile([edit["source"], _overlay(edit["source"], edit["region"]), edit["edited"], _heat(diff)])
    return (f"<tr><td>{html.escape(DISPLAY_NAMES[edit['finding']])}<br><small>{html.escape(edit['prompt'][:200])}"
            f"</small></td><td><img src='{_data_uri(strip)}'></td></tr>")


def demo_generation_section(run_dir: str | Path, data_dir: str | Path, seed: int = 0) -> tuple[str, dict[str, Any]]:
    """Evaluate the run's priors on the demo data; (HTML fragment, metrics). Writes run/eval/synthesis/."""
    from medunifier.eval.common import write_results
    from medunifier.eval.synthesis import evaluate_synthesis
    from medunifier.generate.sampling import Synthesizer

    run_dir, data_dir = Path(run_dir), Path(data_dir)
    synth = Synthesizer.from_run(run_dir)
    results, art = evaluate_synthesis(synth, data_dir / "manifest.jsonl", seed=seed, log=_log)
    write_results(results, run_dir / "eval" / "synthesis")

    k = art.samples_per_prompt
    rows = []
    for i, name in enumerate(COMPETITION_FINDINGS):
        prompt_ids = [p for p, f in enumerate(art.prompt_findings) if f == i][: max(1, 8 // k)]
        if not prompt_ids:
            continue
        images = [art.generated[p * k + j] for p in prompt_ids for j in range(k)]
        prompt = art.prompts[prompt_ids[0]]
        rows.append(f"<tr><td><b>{html.escape(DISPLAY_NAMES[name])}</b><br><small>{html.escape(prompt[:300])}"
                    f"</small></td><td><img src='{_data_uri(_tile(images))}'></td></tr>")
    grid = "<table>" + "".join(rows) + "</table>"
    n_recon = min(8, len(art.real_train))
    recon = (f"<img src='{_data_uri(_tile(list(art.real_train[:n_recon])))}'><br>"
             f"<img src='{_data_uri(_tile(list(art.reconstructions[:n_recon])))}'>")
    edit_rows = "".join(_edit_row(e) for e in art.edits)
    meta = synth.meta
    section = f"""
<h2>Text-to-image generation</h2>
<p>Text-conditioned {html.escape(str(meta.get('config', {}).get('kind', '?')))} priors over the frozen model's VQ codes,
trained for {meta.get('step', '?')} steps (train loss {_fmt(meta.get('loss'))}, val loss {_fmt(meta.get('val_loss'))});
guidance {results['settings']['guidance']}, {results['settings']['steps']} decoding steps per level.
Each row: a report of a reference image with that single finding (the prompt) and images sampled for the first
prompts of that finding ({k} per prompt). All images are synthetic.</p>
{grid}
<h3>Reconstruction (top: real training images; bottom: image -> codes -> image)</h3>
{recon}
<h3>Counterfactual edits (source; edit region in red; edited; |edited - reconstruction|)</h3>
<p>A real image without findings is encoded; inside the region (learnt from the data: where that finding's mean
image differs most from the normal mean) {results['settings']['edit_strength']:.0%} of the codes are re-sampled under
the report of an image with the finding; every other code is kept.</p>
<table>{edit_rows}</table>
<h3>Synthesis metrics</h3>
{_metric_tables(results)}
"""
    return section, results
