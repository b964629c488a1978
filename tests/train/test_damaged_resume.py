"""Resume survives a damaged checkpoint (moved aside, the newest intact one taken); --resume-from picks one;
pretrain reports bad manifest records by reason and writes them all to RUN/data_report.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.config import ConfigError
from medunifier.train.checkpoint import checkpoint_problem, list_checkpoints, resume_checkpoint
from medunifier.train.loop import DataError, train


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def run6(tiny_manifest: Path, tmp_path: Path, small) -> tuple[Path, list[str]]:
    """A run stopped at step 6 of 8 with checkpoints at steps 2, 4 and 6."""
    overrides = small("train.max_steps=8", "train.save_every=2", "train.keep_last=3", "train.warmup_ratio=0.1")
    result = train("tiny", tiny_manifest, tmp_path / "run", max_steps=6, overrides=overrides)
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["step-000002", "step-000004", "step-000006"]
    return result.run_dir, overrides


def test_truncated_latest_model_falls_back_to_the_previous_checkpoint(run6, tiny_manifest: Path, capsys) -> None:
    run, overrides = run6
    _truncate(run / "checkpoints" / "step-000006" / "model.safetensors")
    capsys.readouterr()
    resumed = train("tiny", tiny_manifest, run, resume=True, overrides=overrides)
    out = capsys.readouterr()
    assert "step-000006 is damaged (model.safetensors is truncated" in out.err
    assert "moved aside to step-000006.damaged" in out.err
    assert "resumed from" in out.out and "step-000004 at step 4" in out.out
    assert resumed.step == 8
    assert (run / "checkpoints" / "step-000006.damaged" / "model.safetensors").exists()
    assert [p.name for p in list_checkpoints(run)][-1] == "step-000008"


def test_resume_from_selects_a_checkpoint_and_refuses_a_damaged_one(run6, tiny_manifest: Path) -> None:
    run, overrides = run6
    step6 = run / "checkpoints" / "step-000006"
    (step6 / "trainer_state.json").write_text("")
    with pytest.raises(ConfigError, match=r"step-000006: cannot resume from it \(trainer_state.json is not valid"):
        train("tiny", tiny_manifest, run, resume_from=step6, overrides=overrides)
    assert step6.is_dir()  # an explicit choice is not moved
    resumed = train("tiny", tiny_manifest, run, max_steps=3, resume_from=run / "checkpoints" / "step-000002",
                    overrides=overrides)
    assert resumed.step == 3
    result = CliRunner().invoke(app, ["pretrain", "--data", str(tiny_manifest), "--out", str(run), "--resume-from",
                                      str(step6), *overrides])
    assert result.exit_code == 2 and "trainer_state.json is not valid JSON" in result.output


def _fake_checkpoint(folder: Path, step: int) -> Path:
    import torch

    path = folder / "checkpoints" / f"step-{step:06d}"
    path.mkdir(parents=True)
    for name in ("model", "optimizer", "rank-0"):
        save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path / f"{name}.safetensors"))
    for name in ("optimizer", "rank-0"):
        (path / f"{name}.json").write_text("{}")
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


@pytest.mark.parametrize("damage", ["empty_state", "state_list", "cut_header", "cut_data", "missing_rng",
                                    "bad_header_json"])
def test_checkpoint_problem_names_each_kind_of_damage(tmp_path: Path, damage: str) -> None:
    older, newest = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    assert checkpoint_problem(older) is None and checkpoint_problem(newest) is None
    expected = {
        "empty_state": ("trainer_state.json", "not valid JSON"),
        "state_list": ("trainer_state.json", "expected fields"),
        "cut_header": ("model.safetensors", "truncated"),
        "cut_data": ("optimizer.safetensors", "truncated"),
        "missing_rng": ("rank-0.safetensors", "missing"),
        "bad_header_json": ("model.safetensors", "unreadable header"),
    }[damage]
    if damage == "empty_state":
        (newest / "trainer_state.json").write_text("")
    elif damage == "state_list":
        (newest / "trainer_state.json").write_text("[4]")
    elif damage == "cut_header":
        _truncate(newest / "model.safetensors", keep=0.02)
    elif damage == "cut_data":
        _truncate(newest / "optimizer.safetensors", keep=0.9)
    elif damage == "missing_rng":
        (newest / "rank-0.safetensors").unlink()
    else:
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[8] = ord("!")
        (newest / "model.safetensors").write_bytes(bytes(data))
    problem = checkpoint_problem(newest)
    assert problem is not None and all(part in problem for part in expected), problem
    assert resume_checkpoint(tmp_path) == older
    assert (tmp_path / "checkpoints" / "step-000004.damaged").is_dir() and not newest.exists()


def test_every_checkpoint_damaged_is_an_error(tmp_path: Path, tiny_manifest: Path, small) -> None:
    (_fake_checkpoint(tmp_path / "run", 2) / "trainer_state.json").write_text("")
    with pytest.raises(ConfigError, match="every checkpoint is damaged"):
        train("tiny", tiny_manifest, tmp_path / "run", resume=True, overrides=small())


def test_pretrain_counts_bad_records_by_reason_and_writes_them_all(tiny_manifest: Path, tmp_path: Path, small,
                                                                   capsys) -> None:
    lines = tiny_manifest.read_text().splitlines()
    first = json.loads(lines[0])
    bad = [json.dumps({**first, "image": "../../etc/passwd"})] + [json.dumps(first)] * 3 + ["{not json"] * 7
    data = tiny_manifest.with_name("bad.jsonl")
    data.write_text("\n".join(lines + bad) + "\n")
    run = tmp_path / "run"
    with pytest.raises(DataError, match="fewer than one batch"):  # fails after reading, before the model
        train("tiny", data, run, overrides=small("train.batch_size=9"))
    err = capsys.readouterr().err
    assert "11 records left out (invalid_json: 7, duplicate_id: 3, unsafe_path: 1)" in err
    assert f"the full list: {run / 'data_report.json'}" in err and "... and 6 more" in err
    report = json.loads((run / "data_report.json").read_text())
    assert report["skipped"] == 11 and len(report["problems"]) == 11
    assert report["by_reason"] == {"invalid_json": 7, "duplicate_id": 3, "unsafe_path": 1}
    assert {p["line"] for p in report["problems"] if p["reason"] == "duplicate_id"} == {14, 15, 16}
