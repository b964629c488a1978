"""Configs: presets load; unknown keys, wrong types and impossible values fail naming the key."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.config import ConfigError, load_config, save_config


@pytest.mark.parametrize("preset", ["tiny", "tiny_minilm", "base", "paper"])
def test_presets_load(preset: str) -> None:
    config = load_config(preset)
    assert config.name == preset
    assert config.image.size % config.vision.patch_size == 0


def test_paper_preset_matches_the_paper() -> None:
    c = load_config("paper")
    assert (c.image.size, c.vision.backbone, c.vision.hidden_size, c.vision.patch_size) == (224, "blip2", 1408, 14)
    assert c.num_patches == 256
    assert (c.encoder.hidden_size, c.encoder.num_queries, c.text.max_length, c.encoder.embed_dim) == (768, 32, 95, 256)
    assert (c.generator.codebook_size, c.generator.codebook_dim) == (512, 768)
    assert (c.generator.top_size, c.generator.bottom_size) == (8, 16)
    assert c.train.betas == (0.9, 0.95) and c.train.weight_decay == 0.05
    assert (c.train.lr, c.train.warmup_start_lr, c.train.warmup_ratio) == (1e-4, 1e-5, 0.05)
    assert c.generator.commitment_weight == 0.5
    assert c.vision.frozen


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"encoder\.hiden_size: unknown key"):
        load_config(write(tmp_path, "encoder: {hiden_size: 64}\n"))


def test_wrong_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(write(tmp_path, "train: {batch_size: many}\n"))


def test_image_size_not_divisible_by_patch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not divisible by vision\.patch_size"):
        load_config(write(tmp_path, "image: {size: 60}\nvision: {patch_size: 8}\n"))


def test_heads_must_divide_width() -> None:
    with pytest.raises(ConfigError, match=r"divisible by encoder\.num_heads"):
        load_config("tiny", ["encoder.num_heads=3"])


def test_overrides_apply_and_validate() -> None:
    config = load_config("tiny", ["train.lr=3e-4", "losses.tig=0", "encoder.num_layers=2"])
    assert config.train.lr == 3e-4 and config.losses.enabled() == ["itc", "itm", "itg"]
    assert config.encoder.num_layers == 2
    with pytest.raises(ConfigError, match="key=value"):
        load_config("tiny", ["train.lr"])


def test_missing_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match=r"presets: .*tiny"):
        load_config("huge")


def test_round_trip(tmp_path: Path) -> None:
    config = load_config("tiny", ["train.seed=7"])
    save_config(config, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == config


def test_bad_stage_mixture(tmp_path: Path) -> None:
    text = "train:\n  stages:\n    - {name: s1, steps: 5, mixture: {report: -1}}\n"
    with pytest.raises(ConfigError, match="mixture weights must be >= 0"):
        load_config(write(tmp_path, text))


def test_lr_scale_override_builds_the_mapping_and_rejects_a_non_positive_multiplier() -> None:
    config = load_config("tiny", ["train.lr_scale.generator=3"])
    assert config.train.lr_scale == {"generator": 3.0}
    with pytest.raises(ConfigError, match=r"train\.lr_scale"):
        load_config("tiny", ["train.lr_scale.generator=0"])


def test_empty_config_file_is_an_error(tmp_path: Path) -> None:
    for text in ("", "\n# only a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"empty\.yaml is empty"):
            load_config(path)


@pytest.mark.parametrize("value", ["!!python/object/apply:os.system [ls]", "[1, 2", "{a: 1", "'open"])
def test_bad_override_value_is_one_line_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [f"train.lr={value}"])
    message = str(err.value)
    assert "'train.lr'" in message and "not valid YAML" in message and "\n" not in message
    result = CliRunner().invoke(app, ["pretrain", "--data", "x.jsonl", "--out", "run", f"train.lr={value}"])
    assert result.exit_code == 2 and "train.lr" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("overrides", "message"), [
    (["generator.pixel_size=4"], "needs generator.pixel_channels"),
    (["generator.pixel_channels=8", "generator.pixel_size=32"], "must not exceed the bottom map's side"),
    (["generator.pixel_channels=8", "generator.pixel_level=top", "generator.pixel_size=16"],
     "must not exceed the top map's side"),
])
def test_pixel_path_settings_are_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)
