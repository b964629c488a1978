"""Image size and per-channel normalisation: validated in the config, taken from a vision folder's
preprocessor_config.json unless the config sets them, and used by the Processor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medunifier.config import ConfigError, ImageConfig, VisionConfig, load_config, load_stage0_config
from medunifier.data.images import to_tensor, to_uint8
from medunifier.data.processor import Processor
from medunifier.tokens import load_tokenizer

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _folder(tmp_path: Path, **settings) -> Path:
    """A vision folder holding only a preprocessor_config.json (what the config reads)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings))
    return tmp_path


def test_mean_and_std_take_one_value_or_one_per_channel() -> None:
    assert ImageConfig(channels=3, mean=CLIP_MEAN, std=CLIP_STD).mean == CLIP_MEAN
    assert ImageConfig(channels=1, mean=0.4, std=0.2).mean == 0.4
    with pytest.raises(ValueError, match=r"image.mean has 3 values for image.channels = 1: give one value, or "
                                         r"exactly 1"):
        ImageConfig(channels=1, mean=CLIP_MEAN)
    with pytest.raises(ConfigError, match=r"image\.std has 2 values"):
        load_config("tiny", ["image.channels=3", "image.std=[0.5, 0.5]"])
    with pytest.raises(ConfigError, match="every channel"):
        load_config("tiny", ["image.channels=3", "image.std=[0.5, 0.0, 0.5]"])
    config = load_config("tiny", ["image.mean=null"])  # null without a vision folder: the default
    assert config.image.mean == 0.5 and config.image.std == 0.5 and config.image.size == 64


def test_a_clip_style_folder_sets_mean_std_and_the_size_when_asked(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "clip", image_mean=CLIP_MEAN, image_std=CLIP_STD, do_center_crop=True,
                     size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    base = ["vision.backbone=vit", f"vision.pretrained={folder}", "image.channels=3", "vision.patch_size=16"]
    config = load_config("tiny", base)
    assert config.image.mean == CLIP_MEAN and config.image.std == CLIP_STD
    assert config.image.size == 64  # the preset sets the size: it wins
    assert load_config("tiny", [*base, "image.size=null"]).image.size == 224  # null: the crop size
    overridden = load_config("tiny", [*base, "image.mean=0.3", "image.std=[0.2, 0.2, 0.25]"])
    assert overridden.image.mean == 0.3 and overridden.image.std == [0.2, 0.2, 0.25]
    # saved configs carry the resolved values: a model folder reloads without the vision folder
    assert config.to_dict()["image"]["mean"] == CLIP_MEAN


def test_folder_sizes_and_normalisation_switches(tmp_path: Path) -> None:
    vit = _folder(tmp_path / "vit", image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                  size={"height": 32, "width": 32})
    config = load_config("tiny", [f"vision.pretrained={vit}", "image.size=null", "vision.backbone=vit"])
    assert config.image.size == 32 and config.image.mean == 0.5  # equal channels collapse to one value
    raw = _folder(tmp_path / "raw", do_normalize=False, image_mean=CLIP_MEAN, size=48)
    config = load_config("tiny", [f"vision.pretrained={raw}", "image.size=null", "vision.backbone=vit"])
    assert (config.image.size, config.image.mean, config.image.std) == (48, 0.0, 1.0)
    oblong = _folder(tmp_path / "oblong", size={"height": 32, "width": 64})
    with pytest.raises(ConfigError, match="square"):
        load_config("tiny", [f"vision.pretrained={oblong}", "image.size=null", "vision.backbone=vit"])


def test_per_channel_folder_values_on_grey_input_say_what_to_change(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "clip", image_mean=CLIP_MEAN, image_std=CLIP_STD)
    with pytest.raises(ConfigError, match=r"image.channels is 1: set image.channels=3"):
        load_config("tiny", [f"vision.pretrained={folder}", "vision.backbone=vit"])  # tiny is grey


def test_per_channel_normalisation_round_trips_through_to_tensor_and_to_uint8() -> None:
    rgb = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    pixels = to_tensor(rgb, 8, 3, CLIP_MEAN, CLIP_STD)
    expected = (torch.from_numpy(rgb).permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(
        CLIP_STD)[:, None, None]
    torch.testing.assert_close(pixels, expected)
    assert np.abs(to_uint8(pixels, CLIP_MEAN, CLIP_STD).astype(int) - np.round(rgb * 255)).max() <= 1


def test_pretrain_vision_folder_with_per_channel_stats_is_read_back_into_the_processor(tmp_path: Path) -> None:
    from medunifier.model.stage0 import ImageTower, save_backbone
    from medunifier.model.vision import VisionEncoder

    image = ImageConfig(size=32, channels=3, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    vision = VisionConfig(backbone="resnet", hidden_size=32, num_layers=2, patch_size=8, frozen=False)
    out = save_backbone(ImageTower(vision, image, text_width=0, embed_dim=8), image, tmp_path / "stage0")
    written = json.loads((out / "preprocessor_config.json").read_text())
    assert written["image_mean"] == [0.4, 0.5, 0.6] and written["image_std"] == [0.2, 0.25, 0.3]

    config = load_config("tiny", [f"vision.pretrained={out}", "image.channels=3", "image.size=null",
                                  "vision.hidden_size=32"])
    assert (config.image.size, config.image.mean, config.image.std) == (32, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3])
    processor = Processor.from_config(config, load_tokenizer("minilm"))
    white = processor.preprocess([np.ones((40, 40, 3), np.float32)])  # resized to 32, normalised per channel
    assert white.shape == (1, 3, 32, 32)
    torch.testing.assert_close(white[0, :, 0, 0], torch.tensor([0.6 / 0.2, 0.5 / 0.25, 0.4 / 0.3]))
    encoder = VisionEncoder(config.vision, config.image)  # the backbone loads from the same folder
    assert encoder.preprocessing()["mean"] == [0.4, 0.5, 0.6]
    # stage 0 reads its own folder the same way
    stage0 = load_stage0_config(None, [f"vision.pretrained={out}", "image.channels=3"])
    assert stage0.image.mean == [0.4, 0.5, 0.6] and stage0.image.size == 64
