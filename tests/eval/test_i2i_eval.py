"""`eval i2i`: the metrics, the baselines and a run through a model whose head is still the identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medunifier.config import load_config
from medunifier.data.synthcxr import write_synthcxr
from medunifier.eval.i2i import bicubic, dice_iou, evaluate_i2i, fit_threshold, threshold_mask
from medunifier.model.medunifier import MedUnifier


def test_dice_iou_and_the_fitted_threshold() -> None:
    a = np.zeros((8, 8), bool)
    a[:4] = True
    b = np.zeros((8, 8), bool)
    b[2:6] = True
    assert dice_iou(a, b) == pytest.approx((0.5, 1 / 3))
    assert dice_iou(a, a) == (1.0, 1.0) and dice_iou(~a & a, ~a & a) == (1.0, 1.0)
    images = np.full((3, 8, 8), 40, np.uint8)
    masks = np.zeros((3, 8, 8), bool)
    images[:, 3:5], masks[:, 3:5] = 200, True  # bright structure: a threshold finds it exactly
    level, above, score = fit_threshold(images, masks)
    assert above and 40 < level <= 200 and score == 1.0
    assert (threshold_mask(images, level, above) == masks).all()
    dark = fit_threshold(255 - images, masks)
    assert not dark[1] and dark[2] == 1.0  # a dark structure gets the other direction


def test_bicubic_baseline_matches_its_name() -> None:
    low = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    up = bicubic(low, 32)
    assert up.shape == (32, 32) and up.dtype == np.uint8 and up[0, 0] < up[-1, -1]


def test_an_identity_head_scores_exactly_its_baselines(tmp_path: Path) -> None:
    write_synthcxr(tmp_path, n=10, size=32, seed=4, workers=1, per_class_5x200=0, i2i=20)
    from shrunk_config import SMALL_MODEL

    torch.manual_seed(0)
    model = MedUnifier(load_config("tiny", [*SMALL_MODEL, "i2i.enabled=true", "i2i.channels=8"])).eval()
    results = evaluate_i2i(model, tmp_path / "manifest.jsonl", survival=False, log=lambda *_: None)
    # the output conv starts at zero: translate returns the source, upscale the bicubic input
    for kind, row in results["translate"].items():
        assert row["n"] >= 1 and row["psnr"] == pytest.approx(row["psnr_source"], abs=1e-6), kind
    assert results["translate"]["bone"]["psnr_source"] < results["translate"]["soft_tissue"]["psnr_source"]
    for scale, row in results["upscale"].items():
        assert row["psnr"] == pytest.approx(row["psnr_bicubic"], abs=1e-6), scale
        assert row["ssim"] == pytest.approx(row["ssim_bicubic"], abs=1e-6)
    assert set(results["upscale"]) == {"x2", "x4"} and results["upscale"]["x2"]["psnr_bicubic"] > \
        results["upscale"]["x4"]["psnr_bicubic"]
    heart = results["segment"]["heart"]
    assert heart["n"] >= 1 and 0.0 <= heart["dice"] <= 1.0 and heart["threshold"]["fit_on"] >= 1
