"""Every config field says what it means, and `medunifier config show` prints it."""

import json

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

import medunifier.config as config_module
import medunifier.serve.settings as settings_module
from medunifier.cli import app
from medunifier.config import Stage0Config, describe_fields, load_config

runner = CliRunner()


def _models() -> list[type[BaseModel]]:
    """Every pydantic model the config and serve-settings modules define, plus every section they nest."""
    found: dict[str, type[BaseModel]] = {}
    todo = [o for m in (config_module, settings_module) for o in vars(m).values()
            if isinstance(o, type) and issubclass(o, BaseModel) and o.__module__ == m.__name__]
    while todo:
        cls = todo.pop()
        if cls.__qualname__ in found:
            continue
        found[cls.__qualname__] = cls
        for info in cls.model_fields.values():
            for arg in (info.annotation, *getattr(info.annotation, "__args__", ())):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    todo.append(arg)
    return list(found.values())


def test_the_walk_reaches_every_section() -> None:
    names = {cls.__name__ for cls in _models()}
    assert {"MedUnifierConfig", "Stage0Config", "StageConfig", "AugmentConfig", "LossWeights",
            "ServeSettings"} <= names


@pytest.mark.parametrize("cls", _models(), ids=lambda c: c.__name__)
def test_every_field_has_a_description(cls: type[BaseModel]) -> None:
    missing = [name for name, info in cls.model_fields.items() if not (info.description or "").strip()]
    assert not missing, f"{cls.__name__}: fields without a description: {missing} (add Field(..., description=...))"


def test_describe_fields_lists_every_leaf_with_its_value() -> None:
    cfg = load_config("tiny", ["train.lr=0.00031"])
    rows = {key: (value, text) for key, value, text in describe_fields(cfg)}
    assert rows["train.lr"] == (0.00031, cfg.train.model_fields["lr"].description)
    assert rows["vision.backbone"][0] == cfg.vision.backbone
    assert "train.augment.rotate_degrees" in rows and "train" not in rows  # sections are walked, not listed
    assert all(text for _, text in rows.values())
    staged = load_config("unified")  # a list of sections is walked item by item
    staged_rows = {key: value for key, value, _ in describe_fields(staged)}
    last = len(staged.train.stages) - 1
    assert last > 0 and staged_rows[f"train.stages.{last}.name"] == staged.train.stages[-1].name


def test_config_show_prints_fields_values_and_descriptions() -> None:
    result = runner.invoke(app, ["config", "show", "tiny", "train.max_steps=1234"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    cfg = load_config("tiny")
    for key, value, text in describe_fields(cfg):
        line = next((ln for ln in result.output.splitlines() if f" {key} " in ln), None)
        assert line is not None, key
        if key == "train.max_steps":
            assert "1234" in line
        elif not isinstance(value, (dict, list)):
            assert json.dumps(value) in line, (key, line)
        assert text[:30] in line, (key, line)


def test_config_show_stage0_and_bad_preset() -> None:
    result = runner.invoke(app, ["config", "show", "--stage0", "default"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "queue_size" in result.output and Stage0Config.model_fields["queue_size"].description[:30] in result.output
    result = runner.invoke(app, ["config", "show", "no_such_preset"])
    assert result.exit_code == 2 and "no config file or preset named 'no_such_preset'" in result.output
