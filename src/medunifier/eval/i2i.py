"""Image-to-image against ground truth and trivial baselines: `medunifier eval i2i --ckpt RUN --data MANIFEST`.

The manifest's translate / upscale / segment records (`medunifier data synth --i2i N`) give a source image, an
instruction and the exact target. Every figure stands beside the baseline a method must beat:

- **upscale** (per scale): PSNR (dB, uint8 range) and SSIM (Gaussian window) of the output against the
  full-resolution truth, beside **bicubic** interpolation of the low-resolution source (also the model's input);
- **translate** (per target kind): PSNR and SSIM against the rendered target, beside the **unchanged source**;
- **segment** (per finding): Dice and IoU of the thresholded mask probability (>= 0.5) against the true mask,
  means over images, beside an **intensity-threshold** mask (one grey level and direction per finding, the
  pair with the best mean Dice on the train split's records);
- **finding survival** (bone-suppressed translation): a finding classifier trained on the manifest's train
  radiographs (`eval.edit.cnn_detector`) scores each source finding on the translated image and on the true
  target; the survival ratio is the detection rate on translations over the rate on true targets.

Metrics are pure functions of uint8 arrays; `evaluate_i2i` runs the model, `run_i2i_eval` writes and prints.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from medunifier.data.findings import COMPETITION_FINDINGS
from medunifier.data.images import ImageLoadError, load_image, resize_array, to_tensor
from medunifier.data.manifest import I2I_TASKS, Record, load_records
from medunifier.eval.common import figure, finish_run, model_device, print_table
from medunifier.eval.edit import cnn_detector, psnr_uint8, ssim_uint8
from medunifier.model import load_model
from medunifier.utils import denormalise

__all__ = ["bicubic", "dice_iou", "evaluate_i2i", "fit_threshold", "print_i2i_tables", "run_i2i_eval",
           "threshold_mask", "to_grey_uint8"]

THRESHOLD_LEVELS = np.arange(5, 255, 5)  # grey levels the threshold baseline may pick


def to_grey_uint8(arr: np.ndarray, size: int) -> np.ndarray:
    """A [0, 1] image (H, W) or (H, W, 3) -> uint8 (size, size), bicubic when the size differs."""
    if arr.ndim == 3:
        arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return (resize_array(arr, size) * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def bicubic(lowres: np.ndarray, size: int) -> np.ndarray:
    """The bicubic baseline: a [0, 1] low-resolution image (h, w) resized to uint8 (size, size), exactly as the
    model's input is resized (`data.images.to_tensor`)."""
    return to_grey_uint8(lowres, size)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two bool masks; both empty counts as a perfect (1, 1)."""
    inter, total = float(np.logical_and(pred, truth).sum()), float(pred.sum() + truth.sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / (total - inter)


def threshold_mask(images: np.ndarray, level: int, above: bool) -> np.ndarray:
    """The intensity-threshold baseline: bool masks of uint8 images [N, S, S] at `level` (>= when `above`)."""
    return images >= level if above else images < level


def fit_threshold(images: np.ndarray, masks: np.ndarray) -> tuple[int, bool, float]:
    """(level, above, mean Dice): the grey level and direction whose threshold mask has the best mean Dice on
    uint8 images [N, S, S] against bool masks [N, S, S]."""
    best = (int(THRESHOLD_LEVELS[0]), True, -1.0)
    for above in (True, False):
        for level in THRESHOLD_LEVELS:
            pred = threshold_mask(images, int(level), above)
            score = float(np.mean([dice_iou(p, m)[0] for p, m in zip(pred, masks)]))
            if score > best[2]:
                best = (int(level), above, score)
    return best


def _read(record: Record, field: str, root: Path) -> np.ndarray:
    return load_image(Path(root) / getattr(record, field))


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


@torch.no_grad()
def _scores_against_baseline(kept: Sequence[Record], images: Sequence[np.ndarray], groups: dict[str, list[int]],
                             root: Path, size: int, label: str, baseline: Any,
                             truths: dict[int, np.ndarray] | None = None) -> dict[str, Any]:
    """PSNR and SSIM of the model's images and of `baseline(j)` against each record's `target_image`, per group.

    `truths`, when given, receives the decoded targets by index (for later checks on the same images)."""
    out: dict[str, Any] = {}
    for name, idx in sorted(groups.items()):
        rows = defaultdict(list)
        for j in idx:
            truth = to_grey_uint8(_read(kept[j], "target_image", root), size)
            if truths is not None:
                truths[j] = truth
            base = baseline(j)
            rows["psnr"].append(psnr_uint8(images[j], truth))
            rows["ssim"].append(ssim_uint8(images[j], truth))
            rows[f"psnr_{label}"].append(psnr_uint8(base, truth))
            rows[f"ssim_{label}"].append(ssim_uint8(base, truth))
        out[name] = {"n": len(idx), **{k: _mean(v) for k, v in rows.items()}}
    return out


def _run_model(model: Any, sources: Sequence[np.ndarray], instructions: Sequence[str], batch_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, S, S], mask probabilities [N, S, S]) for [0, 1] source arrays at any size."""
    c = model.config.image
    device = model_device(model)
    images, probs = [], []
    for start in range(0, len(sources), batch_size):
        pixels = torch.stack([to_tensor(s, c.size, c.channels, c.mean, c.std)
                              for s in sources[start : start + batch_size]]).to(device)
        out, mask = model.image_to_image(pixels, list(instructions[start : start + batch_size]))
        grey = denormalise(out.float(), c.mean, c.std).clamp(0, 1).mean(1)  # [B, S, S]
        images.append((grey * 255.0 + 0.5).to(torch.uint8).cpu().numpy())
        probs.append(mask[:, 0].float().cpu().numpy())
    size = c.size
    empty = np.zeros((0, size, size))
    return (np.concatenate(images) if images else empty.astype(np.uint8)), (np.concatenate(probs) if probs else empty)


def evaluate_i2i(model: Any, data: str | Path, *, split: str = "test", max_per_task: int = 300, batch_size: int = 32,
                 classifier_epochs: int = 6, seed: int = 0, survival: bool = True, device: str | None = None,
                 log: Any = print) -> dict[str, Any]:
    """Score a model's image-to-image outputs on a manifest's records of `split` (module doc).

    Args:
        model: a MedUnifier with an image-to-image head.
        data: a manifest with translate / upscale / segment records.
        max_per_task: at most this many records of each task (in manifest order).
        survival: train the finding classifier and report finding survival of bone-suppressed translations.
    """
    t0 = time.perf_counter()
    data = Path(data)
    root = data.parent
    records = load_records(data)
    by_task = {t: [r for r in records if r.task == t and r.split == split][:max_per_task] for t in I2I_TASKS}
    if not any(by_task.values()):
        raise ValueError(f"{data}: no translate, upscale or segment records in split '{split}' (make some with "
                         "`medunifier data synth --i2i N`)")
    size = model.config.image.size
    results: dict[str, Any] = {"task": "i2i", "settings": {"split": split, "max_per_task": max_per_task,
                                                           "data": str(data), "size": size}}
    # (records, their [0, 1] sources, output images uint8 [N, S, S], mask probabilities [N, S, S]) per task
    outputs: dict[str, tuple[list[Record], list[np.ndarray], np.ndarray, np.ndarray]] = {}
    for task, items in by_task.items():
        kept, sources = [], []
        for r in items:
            try:
                sources.append(_read(r, "image", root))
                kept.append(r)
            except ImageLoadError as err:
                log(f"warning: skipped {r.id}: {err}")
        images, probs = _run_model(model, sources, [r.instruction for r in kept], batch_size)
        outputs[task] = (kept, sources, images, probs)

    # upscale: per scale, against bicubic
    kept, sources, images, _ = outputs["upscale"]
    groups: dict[str, list[int]] = defaultdict(list)
    for j, r in enumerate(kept):
        groups[f"x{(r.model_extra or {}).get('scale', '?')}"].append(j)
    upscale = _scores_against_baseline(kept, images, groups, root, size, "bicubic",
                                       lambda j: bicubic(sources[j], size))
    results["upscale"] = upscale

    # translate: per target kind, against the unchanged source
    kept, sources, images, _ = outputs["translate"]
    groups = defaultdict(list)
    for j, r in enumerate(kept):
        groups[str((r.model_extra or {}).get("target_kind", "target"))].append(j)
    truths: dict[int, np.ndarray] = {}
    translate = _scores_against_baseline(kept, images, groups, root, size, "source",
                                         lambda j: to_grey_uint8(sources[j], size), truths)
    results["translate"] = translate

    # segment: per finding, against the threshold fitted on the train split
    segment: dict[str, Any] = {}
    kept, _, _, probs = outputs["segment"]
    train_segment = [r for r in records if r.task == "segment" and r.split == "train"]
    groups = defaultdict(list)
    for j, r in enumerate(kept):
        groups[str((r.model_extra or {}).get("mask_finding", "mask"))].append(j)
    for name, idx in sorted(groups.items()):
        fit = [r for r in train_segment if (r.model_extra or {}).get("mask_finding", "mask") == name][:max_per_task]
        fit_images = np.stack([to_grey_uint8(_read(r, "image", root), size) for r in fit]) if fit else None
        fit_masks = np.stack([to_grey_uint8(_read(r, "mask", root), size) > 127 for r in fit]) if fit else None
        level, above, fit_dice = fit_threshold(fit_images, fit_masks) if fit else (128, True, None)
        rows = defaultdict(list)
        for j in idx:
            truth = to_grey_uint8(_read(kept[j], "mask", root), size) > 127
            source = to_grey_uint8(_read(kept[j], "image", root), size)
            dice, iou = dice_iou(probs[j] >= 0.5, truth)
            base_dice, base_iou = dice_iou(threshold_mask(source, level, above), truth)
            rows["dice"].append(dice)
            rows["iou"].append(iou)
            rows["dice_threshold"].append(base_dice)
            rows["iou_threshold"].append(base_iou)
        segment[name] = {"n": len(idx), **{k: _mean(v) for k, v in rows.items()},
                         "threshold": {"level": level, "above": above, "train_dice": fit_dice, "fit_on": len(fit)}}
    results["segment"] = segment

    # finding survival through bone suppression
    kept, sources, images, _ = outputs["translate"]
    soft = [j for j, r in enumerate(kept) if (r.model_extra or {}).get("target_kind") == "soft_tissue"]
    if survival and soft:
        t = time.perf_counter()
        report_records = [r for r in records if r.task not in I2I_TASKS and r.task != "edit"]
        detect, info = cnn_detector(report_records, root, size, list(COMPETITION_FINDINGS), classifier_epochs, seed,
                                    device)
        pairs = [(j, c) for j in soft for c, name in enumerate(COMPETITION_FINDINGS) if kept[j].labels.get(name) == 1]
        if pairs:
            rows_idx = np.array([j for j, _ in pairs])
            cols = np.array([c for _, c in pairs])
            p_model = detect(images[rows_idx])[np.arange(len(pairs)), cols]
            p_truth = detect(np.stack([truths[j] for j in rows_idx]))[np.arange(len(pairs)), cols]
            p_source = detect(np.stack([to_grey_uint8(sources[j], size) for j in rows_idx]))[np.arange(len(pairs)), cols]
            rate_model, rate_truth = float((p_model >= 0.5).mean()), float((p_truth >= 0.5).mean())
            per = {COMPETITION_FINDINGS[c]: {"n": int((cols == c).sum()),
                                             "translated": float((p_model[cols == c] >= 0.5).mean()),
                                             "true_target": float((p_truth[cols == c] >= 0.5).mean())}
                   for c in sorted(set(cols.tolist()))}
            results["survival"] = {"n_findings": len(pairs), "rate_translated": rate_model, "rate_true_target": rate_truth,
                                   "rate_source": float((p_source >= 0.5).mean()),
                                   "ratio": rate_model / rate_truth if rate_truth > 0 else None,
                                   "per_finding": per, "classifier": info, "seconds": time.perf_counter() - t}
    results["n"] = {t: len(v[0]) for t, v in outputs.items()}
    results["seconds"] = time.perf_counter() - t0
    return results


def run_i2i_eval(ckpt: str | Path, data: str | Path, out: str | Path | None = None, *, device: str | None = None,
                 console: Console | None = None, **kwargs: Any) -> dict[str, Any]:
    """`medunifier eval i2i`: load the run's model, evaluate, write results.json, print the tables."""
    from medunifier.generate.train_prior import model_dir_of

    console = console or Console()
    model = load_model(model_dir_of(ckpt), device)
    if getattr(model, "i2i", None) is None:
        raise ValueError(f"{ckpt}: the model has no image-to-image head (train it with i2i.enabled=true and "
                         "'i2i:' mixture keys)")
    results = evaluate_i2i(model, data, device=device, log=console.print, **kwargs)
    return finish_run(results, ckpt, out, print_i2i_tables, console)


def print_i2i_tables(results: dict[str, Any], console: Console | None = None) -> None:
    rows = [[f"upscale {k}", str(v["n"]), figure(v["psnr"], 2), figure(v["psnr_bicubic"], 2), figure(v["ssim"]),
             figure(v["ssim_bicubic"])] for k, v in results["upscale"].items()]
    rows += [[f"translate to {k}", str(v["n"]), figure(v["psnr"], 2), figure(v["psnr_source"], 2),
              figure(v["ssim"]), figure(v["ssim_source"])] for k, v in results["translate"].items()]
    print_table("image outputs against the truth (baseline: bicubic for upscale, the unchanged source for translate)",
                ["task", "n", "PSNR dB", "baseline PSNR", "SSIM", "baseline SSIM"], rows, console)
    rows = [[k, str(v["n"]), figure(v["dice"]), figure(v["dice_threshold"]), figure(v["iou"]),
             figure(v["iou_threshold"])] for k, v in results["segment"].items()]
    print_table("masks against the truth (baseline: an intensity threshold fitted on the train split)",
                ["finding", "n", "Dice", "threshold Dice", "IoU", "threshold IoU"], rows, console)
    s = results.get("survival")
    if s:
        rows = [["all", str(s["n_findings"]), figure(s["rate_translated"]), figure(s["rate_true_target"]),
                 figure(s["ratio"])]]
        rows += [[k, str(v["n"]), figure(v["translated"]), figure(v["true_target"]), "-"]
                 for k, v in s["per_finding"].items()]
        print_table("findings surviving bone suppression (classifier detection rate)",
                    ["finding", "n", "translated", "true target", "ratio"], rows, console)
