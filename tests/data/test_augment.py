"""Batch augmentation: exact geometry on hand-made images, identity at zero strength, determinism, pairs."""

from __future__ import annotations

import pytest
import torch

from medunifier.config import AugmentConfig, ConfigError, load_config
from medunifier.data.augment import augment_batch, draw_parameters, jitter, warp

ONE, ZERO = torch.ones(1), torch.zeros(1)


def _dot(row: int, col: int, size: int = 4) -> torch.Tensor:
    x = torch.zeros(1, 1, size, size)
    x[0, 0, row, col] = 1.0
    return x


def test_rotation_by_90_degrees_is_rot90_counter_clockwise() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    out = warp(x, torch.ones(2), torch.full((2,), 90.0), torch.zeros(2, 2))
    torch.testing.assert_close(out, torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)
    out = warp(x, torch.ones(2), torch.full((2,), -90.0), torch.zeros(2, 2))
    torch.testing.assert_close(out, torch.rot90(x, -1, (2, 3)), atol=1e-5, rtol=0)


def test_shift_moves_content_right_and_down() -> None:
    # a quarter of a 4-pixel side is one pixel
    right = warp(_dot(1, 1), ONE, ZERO, torch.tensor([[0.25, 0.0]]))
    torch.testing.assert_close(right, _dot(1, 2), atol=1e-6, rtol=0)
    down = warp(_dot(1, 1), ONE, ZERO, torch.tensor([[0.0, 0.25]]))
    torch.testing.assert_close(down, _dot(2, 1), atol=1e-6, rtol=0)


def test_flip_mirrors_left_right_and_zoom_magnifies_the_centre() -> None:
    flipped = warp(_dot(2, 0), ONE, ZERO, torch.zeros(1, 2), torch.tensor([True]))
    torch.testing.assert_close(flipped, _dot(2, 3), atol=1e-6, rtol=0)
    # zoom 2 shows the central half: a centred 4x4 block of an 8x8 image fills the output (all but the
    # outermost ring, which interpolates with the zeros around the block)
    x = torch.zeros(1, 1, 8, 8)
    x[..., 2:6, 2:6] = 1.0
    zoomed = warp(x, torch.tensor([2.0]), ZERO, torch.zeros(1, 2))
    assert torch.all(zoomed[..., 1:7, 1:7] == 1.0) and x.sum() == 16 and zoomed.sum() > 50


def test_jitter_scales_around_the_image_mean_then_shifts() -> None:
    x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])  # mean 3
    out = jitter(x, brightness=torch.tensor([0.5]), contrast=torch.tensor([0.5]))
    expected = torch.tensor([[[[1.5, 2.5], [3.5, 4.5]]]]) + 0.5
    torch.testing.assert_close(out, expected)


def _batch(n: int = 4, size: int = 16) -> dict:
    torch.manual_seed(3)
    pixels = torch.rand(n, 1, size, size) * 2 - 1
    return {"pixel_values": pixels, "source_pixel_values": pixels.clone(), "ids": [str(i) for i in range(n)]}


def test_zero_strength_is_the_identity_and_disabled_returns_the_batch() -> None:
    batch = _batch()
    assert augment_batch(batch, AugmentConfig()) is batch  # off by default
    still = AugmentConfig(enabled=True, scale=(1.0, 1.0), rotate_degrees=0, translate=0, brightness=0, contrast=0)
    out = augment_batch(batch, still)
    torch.testing.assert_close(out["pixel_values"], batch["pixel_values"], atol=1e-5, rtol=0)


def test_draws_are_reproducible_vary_by_image_and_keep_edit_pairs_aligned() -> None:
    config = AugmentConfig(enabled=True)
    batch = _batch()
    a = augment_batch(batch, config, torch.Generator().manual_seed(0))
    b = augment_batch(batch, config, torch.Generator().manual_seed(0))
    c = augment_batch(batch, config, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert not torch.allclose(a["pixel_values"], c["pixel_values"])
    assert not torch.allclose(a["pixel_values"], batch["pixel_values"])
    # the source of an edit pair gets the same warp as its target
    torch.testing.assert_close(a["source_pixel_values"], a["pixel_values"])
    params = draw_parameters(config, 1000, torch.Generator().manual_seed(0))
    assert params["angle"].abs().max() <= 5.0 and params["angle"].std() > 2.0
    assert params["zoom"].min() >= 1.0 and params["zoom"].max() <= 1.0 / 0.85**0.5 + 1e-6
    assert not params["flip"].any()  # hflip off by default (laterality)
    assert params["contrast"].min() >= 0.9 and params["contrast"].max() <= 1.1


def test_augment_settings_are_validated_from_the_config() -> None:
    config = load_config("tiny", ["train.augment.enabled=true", "train.augment.rotate_degrees=10"])
    assert config.train.augment.enabled and config.train.augment.rotate_degrees == 10
    with pytest.raises(ConfigError, match="scale"):
        load_config("tiny", ["train.augment.scale=[0.9,0.5]"])
    with pytest.raises(ConfigError):
        load_config("tiny", ["train.augment.rotation=5"])  # unknown key
