"""The demo's training budgets: fixed step counts by default, a wall-clock budget only when asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.demo import DEMO_STEPS, demo_budgets


def test_default_budgets_are_fixed_step_counts() -> None:
    budgets = demo_budgets()
    assert budgets == {name: {"steps": DEMO_STEPS[name], "minutes": None} for name in ("stage0", "stage1", "prior")}


def test_a_stage_given_minutes_is_fitted_to_time_and_the_others_keep_their_steps() -> None:
    budgets = demo_budgets(minutes=4.0, prior_steps=7)
    assert budgets["stage1"] == {"steps": None, "minutes": 4.0}
    assert budgets["prior"] == {"steps": 7, "minutes": None}
    assert budgets["stage0"] == {"steps": DEMO_STEPS["stage0"], "minutes": None}


@pytest.mark.parametrize("kwargs, message", [
    ({"stage0_steps": 10, "stage0_minutes": 1.0}, "--stage0-steps or --stage0-minutes, not both"),
    ({"steps": 0}, "--steps must be positive"),
    ({"prior_minutes": -1.0}, "--prior-minutes must be positive"),
])  # fmt: skip
def test_incompatible_or_empty_budgets_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        demo_budgets(**kwargs)


def test_cli_refuses_both_budgets_before_doing_any_work(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "5", "--minutes", "1"])
    assert result.exit_code == 2
    assert "not both" in result.output
    assert not out.exists()
