"""The image-to-image loss: per-item log-MSE weighs items by relative error; mask positives can be up-weighted."""

from __future__ import annotations

import math

import pytest
import torch

from medunifier.config import ConfigError, load_config
from medunifier.model.i2i import LOG_MSE_EPS, i2i_loss


def _two_items(offsets: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two image items whose predictions are off their targets by a uniform offset each, and no mask items."""
    targets = torch.zeros(2, 1, 8, 8)
    images = torch.stack([torch.full((1, 8, 8), o) for o in offsets]).requires_grad_(True)
    return images, targets, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.bool)


def _item_grad_norms(image_loss: str, offsets: tuple[float, float]) -> list[float]:
    images, targets, masks, is_mask = _two_items(offsets)
    loss, _ = i2i_loss(images, torch.zeros_like(masks), targets, masks, is_mask, image_loss=image_loss)
    loss.backward()
    return [images.grad[i].norm().item() for i in range(2)]


def test_log_mse_is_the_mean_log_of_each_items_mse() -> None:
    images, targets, masks, is_mask = _two_items((0.1, 0.01))
    loss, parts = i2i_loss(images, torch.zeros_like(masks), targets, masks, is_mask, image_loss="log_mse")
    expected = (math.log(0.1**2 + LOG_MSE_EPS) + math.log(0.01**2 + LOG_MSE_EPS)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["i2i_mse"].item() == pytest.approx((0.1**2 + 0.01**2) / 2, rel=1e-5)  # plain MSE, for the logs


def test_log_mse_does_not_let_the_item_with_the_larger_error_drown_the_other() -> None:
    # Plain MSE: the item 10x further off gets a 10x larger gradient. Log-MSE: each item's gradient is divided by
    # its own error, so the nearly-right item is pushed at least as hard as the far one.
    big, small = _item_grad_norms("mse", (0.1, 0.01))
    assert big / small == pytest.approx(10.0, rel=1e-4)
    big, small = _item_grad_norms("log_mse", (0.1, 0.01))
    assert small > 5 * big


def test_mask_positive_weight_scales_the_gradient_on_mask_pixels_only() -> None:
    masks = torch.zeros(1, 1, 8, 8)
    masks[..., 2:4, 2:4] = 1.0
    grads = {}
    for weight in (1.0, 4.0):
        logits = torch.zeros(1, 1, 8, 8, requires_grad=True)
        images = torch.zeros(1, 1, 8, 8)
        loss, parts = i2i_loss(images, logits, images, masks, torch.ones(1, dtype=torch.bool),
                               mask_pos_weight=weight)
        loss.backward()
        grads[weight] = logits.grad[0, 0]
        assert "i2i_dice" in parts and "i2i_mse" not in parts
    # BCE's gradient is w*(p-1) on a positive pixel and p on a negative one; the soft-Dice part is the same for
    # both weights, so the difference isolates BCE: (4-1)*(0.5-1)/64 on positives, 0 on negatives.
    diff = grads[4.0] - grads[1.0]
    assert torch.allclose(diff[2:4, 2:4], torch.full((2, 2), 3 * -0.5 / 64), atol=1e-7)
    assert diff[masks[0, 0] == 0].abs().max().item() < 1e-8


def test_unknown_image_loss_is_refused() -> None:
    images, targets, masks, is_mask = _two_items((0.1, 0.01))
    with pytest.raises(ValueError, match="image_loss"):
        i2i_loss(images, torch.zeros_like(masks), targets, masks, is_mask, image_loss="l1")
    with pytest.raises(ConfigError, match="image_loss"):
        load_config("tiny", ["i2i.image_loss=l1"])
    with pytest.raises(ConfigError, match="mask_pos_weight"):
        load_config("tiny", ["i2i.mask_pos_weight=0"])
