"""Counterfactual edits scored against ground truth: `medunifier eval edit --ckpt RUN --data MANIFEST`.

The manifest's edit records (task "edit", e.g. SynthCXR pairs from `medunifier data synth --pairs N`)
hold a source image, the ground-truth target image (the same patient with one added finding) and the
target's report. Each source is encoded to its codes (grounded on its own report when the record has
`source_text`), a `strength` share of the codes is re-sampled under the target report (inside the pair's
`edit_region` mask with `region="mask"`, else anywhere) and decoded. Scores, means over pairs:

- **SSIM** (mean of the Gaussian-window map of `eval.image_metrics.ssim_map`) and **PSNR** (dB, uint8 range,
  capped at 100 dB for identical images) of the edited image against the target. Two references put them
  in scale: the unedited source against the target ("do nothing") and the source's VQ reconstruction
  against the target (an edit that changes no code: the decoder's floor for this comparison).
- **SSIM outside the region** (where target and source are identical; the region grown by the SSIM window's
  radius, 5 px, so that no window reaches an edited pixel) against the target: how much the edit disturbed
  what it should have kept; and inside the (ungrown) region, where the finding is.
- **Flip rate**: a finding classifier trained on the manifest's real train images (the small CNN of
  `eval.finding_classifier`, one sigmoid per finding) scores each edited image; a flip is the added
  finding's probability reaching 0.5, counted among pairs whose source reconstruction it did not already
  call positive. Its detection rate on the real targets (the most an edit can show through this
  classifier) and its false-positive rate on the real sources are reported beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from medunifier.data.findings import FINDINGS
from medunifier.data.images import ImageLoadError, load_image, resize_array
from medunifier.data.manifest import Record, load_records
from medunifier.eval.common import figure, finish_run, print_table
from medunifier.eval.finding_classifier import MAX_CLASSIFIER_IMAGES, to_input, train_cnn_classifier
from medunifier.eval.image_metrics import masked_ssim, ssim_map
from medunifier.eval.synthesis import load_grey
from medunifier.utils import psnr_db

SSIM_RADIUS = 5  # the Gaussian window of ssim_map (sigma 1.5, truncated at 3.5 sigma) reaches 5 px
Detector = Callable[[np.ndarray], np.ndarray]  # uint8 (N, S, S) -> probabilities [N, K] of `classes`


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images, 10 log10(255^2 / MSE), capped at PSNR_CAP_DB."""
    return psnr_db(float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)), peak=255.0)


def ssim_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 images (Gaussian window, Wang et al. 2004)."""
    return float(ssim_map(a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0).mean())


def added_finding(record: Record) -> str | None:
    """The finding an edit record adds: its `edit_finding` (SynthCXR), else the one label that turns on
    between `source_labels` and `labels`; None when unknown or several."""
    extra = record.model_extra or {}
    named = (extra.get("edit_finding") or {}).get("name")
    if named:
        return named
    before = extra.get("source_labels") or {}
    turned_on = [k for k, v in record.labels.items() if v == 1 and before.get(k) == 0 and k != "no_finding"]
    return turned_on[0] if len(turned_on) == 1 else None


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation of a bool mask by a (2 pixels + 1) square."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, structure=np.ones((2 * pixels + 1, 2 * pixels + 1), bool))


def _grey(path: Path, size: int) -> np.ndarray:
    arr = load_image(path)
    if arr.ndim == 3:
        arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (resize_array(arr, size) * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def load_pairs(records: Sequence[Record], root: Path, size: int
               ) -> tuple[list[Record], np.ndarray, np.ndarray, list[np.ndarray | None]]:
    """Readable edit records and their (source, target) uint8 images [N, S, S] and region masks (or None)."""
    kept, sources, targets, regions = [], [], [], []
    for r in records:
        mask_path = (r.model_extra or {}).get("edit_region")
        try:
            source, target = _grey(r.image_path(root), size), _grey(r.target_image_path(root), size)
            region = None if mask_path is None else _grey(root / mask_path, size) > 127
        except ImageLoadError as err:
            print(f"warning: skipped edit pair {r.id}: {err}")
            continue
        kept.append(r)
        sources.append(source)
        targets.append(target)
        regions.append(region)
    empty = np.zeros((0, size, size), np.uint8)
    return kept, (np.stack(sources) if sources else empty), (np.stack(targets) if targets else empty), regions


def cnn_detector(records: Sequence[Record], root: Path, size: int, classes: Sequence[str], epochs: int = 6,
                 seed: int = 0, device: str | None = None) -> tuple[Detector, dict[str, Any]]:
    """The small CNN of `eval.synthesis` trained on every train image (multi-label over `classes`), as a
    detector returning per-finding sigmoid probabilities (not renormalised: findings are independent)."""
    train = [r for r in records if r.image and r.split == "train" and r.task != "edit"][:MAX_CLASSIFIER_IMAGES]
    single = [r for r in records if r.image and r.task != "edit"
              and sum(r.labels.get(c) == 1 for c in classes) == 1]
    val = [r for r in single if r.split == "val"] or [r for r in single if r.split == "train"][-200:]
    if not train or not val:
        raise ValueError("the finding classifier needs train images with labels and some images with exactly one "
                         f"of {list(classes)}")
    train, x_train = load_grey(train, root, size)
    val, x_val = load_grey(val, root, size)
    y_train = np.array([[r.labels.get(c, -1) for c in classes] for r in train])
    y_val = np.array([next(i for i, c in enumerate(classes) if r.labels.get(c) == 1) for r in val])
    clf = train_cnn_classifier(x_train, y_train, x_val, y_val, classes, epochs=epochs, seed=seed, device=device)
    net = clf.net

    @torch.no_grad()
    def detect(images: np.ndarray) -> np.ndarray:
        x = to_input(images).to(next(net.parameters()).device)
        return torch.cat([net(x[i : i + 256]).sigmoid().cpu() for i in range(0, len(x), 256)]).double().numpy()

    return detect, {"kind": "cnn", "train_images": len(train), **clf.info}


def evaluate_edit_pairs(
    synth: Any,
    data: str | Path,
    *,
    split: str = "test",
    strength: float = 0.6,
    region: str = "mask",
    guidance: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    max_pairs: int = 200,
    batch_size: int = 16,
    classifier_epochs: int = 6,
    detector: tuple[Detector, Sequence[str]] | None = None,
    device: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Edit the sources of a manifest's edit pairs toward their target reports and score them (module doc).

    `synth` is a `generate.sampling.Synthesizer` (or anything with its preprocess / encode / edit_codes /
    decode / to_uint8 methods); `detector` = (function, classes) replaces the CNN trained here.
    """
    if region not in ("mask", "none"):
        raise ValueError(f"region must be 'mask' or 'none', got {region!r}")
    t0 = time.perf_counter()
    data = Path(data)
    records = load_records(data)
    root = data.parent
    edits = [r for r in records if r.task == "edit" and r.target_image and r.split == split]
    if not edits:
        splits = sorted({r.split for r in records if r.task == "edit"})
        raise ValueError(f"{data}: no edit records with a target_image in split '{split}' (edit records in splits "
                         f"{splits}; make some with `medunifier data synth --pairs N`)")
    size = synth.model.config.image.size
    edits, x_src, x_tgt, masks = load_pairs(edits[:max_pairs], root, size)
    if not edits:
        raise ValueError(f"{data}: no readable edit pair in split '{split}'")
    findings = [added_finding(r) for r in edits]

    timings: dict[str, float] = {}
    if detector is None:
        classes = [c for c in FINDINGS if c in set(findings)]
        detect, detector_info = cnn_detector(records, root, size, classes, classifier_epochs, seed, device)
    else:
        detect, classes = detector[0], list(detector[1])
        detector_info = {"kind": "given"}
    timings["classifier_s"] = time.perf_counter() - t0

    # edit every source toward its target report, in batches
    t = time.perf_counter()
    edited, recon = [], []
    for start in range(0, len(edits), batch_size):
        part = edits[start : start + batch_size]
        source_texts = [(r.model_extra or {}).get("source_text") for r in part]
        pixels = synth.preprocess(list(x_src[start : start + len(part)]))
        top, bottom = synth.encode(pixels, None if any(s is None for s in source_texts) else source_texts)
        where = None
        if region == "mask":  # pairs without a mask are edited anywhere
            where = torch.from_numpy(np.stack([m if m is not None else np.ones((size, size), bool)
                                               for m in masks[start : start + len(part)]]))
        new_top, new_bottom, _, _ = synth.edit_codes(top, bottom, [r.text for r in part], strength=strength,
                                                     region=where, guidance=guidance, steps=steps, seed=seed + start)
        edited += synth.to_uint8(synth.decode(new_top, new_bottom))
        recon += synth.to_uint8(synth.decode(top, bottom))
    x_edit, x_recon = np.stack(edited), np.stack(recon)
    timings["edit_s"] = time.perf_counter() - t
    timings["edit_s_per_pair"] = timings["edit_s"] / len(edits)

    # image agreement with the ground-truth target
    rows = []
    for j in range(len(edits)):
        row = {
            "ssim": ssim_uint8(x_edit[j], x_tgt[j]), "psnr": psnr_uint8(x_edit[j], x_tgt[j]),
            "ssim_source": ssim_uint8(x_src[j], x_tgt[j]), "psnr_source": psnr_uint8(x_src[j], x_tgt[j]),
            "ssim_reconstruction": ssim_uint8(x_recon[j], x_tgt[j]),
            "psnr_reconstruction": psnr_uint8(x_recon[j], x_tgt[j]),
        }
        if masks[j] is not None and masks[j].any():
            row["ssim_inside"] = masked_ssim(x_edit[j], x_tgt[j], masks[j])
            outside = ~grow(masks[j], SSIM_RADIUS)
            if outside.any():
                row["ssim_outside"] = masked_ssim(x_edit[j], x_tgt[j], outside)
                row["ssim_outside_reconstruction"] = masked_ssim(x_recon[j], x_tgt[j], outside)
        rows.append(row)

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return float(np.mean(values)) if values else None

    # finding flips through the classifier
    scored = [j for j, f in enumerate(findings) if f in classes]
    flips: dict[str, Any] = {"classes": classes, "n_scored": len(scored)}
    if scored:
        column = np.array([classes.index(findings[j]) for j in scored])
        pick = np.arange(len(scored))
        p_edit = detect(x_edit[scored])[pick, column]
        p_recon = detect(x_recon[scored])[pick, column]
        p_target = detect(x_tgt[scored])[pick, column]
        p_source = detect(x_src[scored])[pick, column]
        eligible = p_recon < 0.5
        flipped = (p_edit >= 0.5) & eligible
        per = {}
        for name in classes:
            sel = eligible & (column == classes.index(name))
            if sel.any():
                per[name] = {"flip_rate": float(flipped[sel].mean()), "n": int(sel.sum())}
        flips.update({
            "flip_rate": float(flipped[eligible].mean()) if eligible.any() else None,
            "flip_rate_per_finding": per,
            "already_positive_before": float((~eligible).mean()),
            "detected_on_real_targets": float((p_target >= 0.5).mean()),
            "detected_on_real_sources": float((p_source >= 0.5).mean()),
            "mean_probability_edited": float(p_edit.mean()),
            "mean_probability_reconstruction": float(p_recon.mean()),
            "mean_probability_real_targets": float(p_target.mean()),
        })
    timings["total_s"] = time.perf_counter() - t0
    log(f"{len(edits)} edit pairs ({split}): SSIM to target {mean('ssim'):.3f} (source {mean('ssim_source'):.3f}, "
        f"reconstruction {mean('ssim_reconstruction'):.3f}), flip rate {flips.get('flip_rate')}")
    return {
        "task": "edit",
        "settings": {"split": split, "strength": strength, "region": region, "guidance": guidance, "steps": steps,
                     "seed": seed, "max_pairs": max_pairs, "data": str(data)},
        "n": len(edits),
        "findings": {name: findings.count(name) for name in sorted({f for f in findings if f})},
        "ssim": mean("ssim"), "psnr": mean("psnr"),
        "ssim_source": mean("ssim_source"), "psnr_source": mean("psnr_source"),
        "ssim_reconstruction": mean("ssim_reconstruction"), "psnr_reconstruction": mean("psnr_reconstruction"),
        "ssim_outside": mean("ssim_outside"), "ssim_inside": mean("ssim_inside"),
        "ssim_outside_reconstruction": mean("ssim_outside_reconstruction"),
        "flips": flips,
        "classifier": detector_info,
        "timings": timings,
    }


def run_edit_eval(ckpt: str | Path, data: str | Path, out: str | Path | None = None, *, device: str | None = None,
                  console: Console | None = None, **kwargs: Any) -> dict[str, Any]:
    """`medunifier eval edit`: load the run's model and prior, evaluate the edit pairs, write results.json, print."""
    from medunifier.generate.sampling import Synthesizer

    console = console or Console()
    synth = Synthesizer.from_run(ckpt, device=device)
    results = evaluate_edit_pairs(synth, data, device=device, log=console.print, **kwargs)
    return finish_run(results, ckpt, out, print_edit_table, console)


def print_edit_table(results: dict[str, Any], console: Console | None = None) -> None:
    r = results
    rows = [["edited vs target", figure(r["ssim"]), figure(r["psnr"])],
            ["source vs target (no edit)", figure(r["ssim_source"]), figure(r["psnr_source"])],
            ["reconstruction vs target", figure(r["ssim_reconstruction"]), figure(r["psnr_reconstruction"])],
            ["edited vs target, outside region", figure(r["ssim_outside"]), "-"],
            ["edited vs target, inside region", figure(r["ssim_inside"]), "-"]]
    print_table(f"counterfactual edits on {r['n']} ground-truth pairs", ["comparison", "SSIM", "PSNR (dB)"], rows,
                console)
    fl = r["flips"]
    rows = [[k, figure(v)] for k, v in fl.items() if not isinstance(v, (dict, list))]
    rows += [[f"flip rate: {k}", f"{figure(v['flip_rate'])} (n={v['n']})"]
             for k, v in fl.get("flip_rate_per_finding", {}).items()]
    print_table("added finding through the classifier", ["measure", "value"], rows, console)
