"""Failures: bad config or data fail before the model is built; NaN stops (or skips); bad images are skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from medunifier.cli import app
from medunifier.config import ConfigError
from medunifier.model.medunifier import MedUnifier
from medunifier.train import loop
from medunifier.train.checkpoint import latest_checkpoint
from medunifier.train.loop import DataError, NonFiniteLossError, train
from medunifier.train.metrics import read_metrics


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building a model fails the test: these errors must come first."""

    def refuse(config):
        raise AssertionError("the model was built before the error was found")

    monkeypatch.setattr(loop, "build_model", refuse)


def test_missing_data_fails_before_the_model(tmp_path: Path, small, no_model) -> None:
    with pytest.raises(DataError, match="data path not found"):
        train("tiny", tmp_path / "nowhere.jsonl", tmp_path / "run", overrides=small())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"without manifest\.jsonl"):
        train("tiny", tmp_path / "empty", tmp_path / "run", overrides=small())


def test_manifest_without_train_records_fails_before_the_model(tiny_manifest: Path, tmp_path: Path, small,
                                                                no_model) -> None:
    lines = [json.loads(line) for line in tiny_manifest.read_text().splitlines()]
    val_only = tiny_manifest.with_name("val_only.jsonl")
    val_only.write_text("".join(json.dumps({**r, "split": "val"}) + "\n" for r in lines))
    with pytest.raises(DataError, match="no training records"):
        train("tiny", val_only, tmp_path / "run", overrides=small())
    with pytest.raises(DataError, match="fewer than one batch of 9"):  # 8 train records
        train("tiny", tiny_manifest, tmp_path / "run", overrides=small("train.batch_size=9"))


def test_wrong_config_fails_before_the_model(tiny_manifest: Path, tmp_path: Path, small, no_model) -> None:
    with pytest.raises(ConfigError, match=r"train\.bogus"):
        train("tiny", tiny_manifest, tmp_path / "run", overrides=small("train.bogus=1"))
    with pytest.raises(ConfigError, match="no config file or preset"):
        train("no-such-preset", tiny_manifest, tmp_path / "run")
    stages = "train.stages=[{name: a, steps: 2, mixture: {ct-scans: 1}}]"
    with pytest.raises(ConfigError, match=r"mixture keys \['ct-scans'\] match no task or source"):
        train("tiny", tiny_manifest, tmp_path / "run", overrides=small(stages))
    stages = "train.stages=[{name: a, steps: 2, train_modules: [decoder]}]"
    with pytest.raises(ConfigError, match="train_modules"):
        train("tiny", tiny_manifest, tmp_path / "run", overrides=small(stages))
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_input_with_exit_code_2(tmp_path: Path, small, no_model) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["pretrain", "--data", str(tmp_path / "missing.jsonl"), "--out",
                                 str(tmp_path / "run"), *small()])
    assert result.exit_code == 2, result.output
    assert "data path not found" in result.output


def _nan_on_call(monkeypatch: pytest.MonkeyPatch, bad_call: int, spoil=lambda loss: loss * float("nan")) -> None:
    """The `bad_call`-th training forward (1-based) returns `spoil(loss)`: by default a NaN loss."""
    original = MedUnifier.forward
    calls = {"n": 0}

    def forward(self, batch, loss_weights=None):
        out = original(self, batch, loss_weights)
        if self.training:
            calls["n"] += 1
            if calls["n"] == bad_call:
                out.loss = spoil(out.loss)
        return out

    monkeypatch.setattr(MedUnifier, "forward", forward)


def test_nan_loss_stops_with_details_after_saving_the_last_good_state(
    tiny_manifest: Path, tmp_path: Path, small, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    overrides = small("train.max_steps=4")
    with monkeypatch.context() as patch, pytest.raises(NonFiniteLossError) as info:
        _nan_on_call(patch, 3)
        train("tiny", tiny_manifest, run, overrides=overrides)
    message = str(info.value)
    assert "non-finite loss at step 3" in message
    assert "tiny-0" in message  # the batch's sample ids
    assert "'loss': nan" in message and "loss_itc" in message
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2]

    # the bad batch was transient: resuming finishes the run
    result = train("tiny", tiny_manifest, run, resume=True, overrides=overrides)
    assert result.step == 4 and [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4]


def test_nan_loss_is_skipped_and_counted_when_configured(
    tiny_manifest: Path, tmp_path: Path, small, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on_call(monkeypatch, 2)
    run = tmp_path / "run"
    result = train("tiny", tiny_manifest, run, overrides=small("train.max_steps=4", "train.skip_nonfinite=true"))
    assert result.step == 4 and result.skipped_steps == 1
    records = {r["step"]: r for r in read_metrics(run, "train")}
    assert "loss" not in records[2] and records[2]["skipped_steps"] == 1
    assert records[1]["skipped_steps"] == 0 and records[4]["skipped_steps"] == 1
    assert all(isinstance(records[s]["loss"], float) for s in (1, 3, 4))
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_nan_in_one_micro_batch_skips_the_whole_accumulated_step(
    tiny_manifest: Path, tmp_path: Path, small, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grad_accum=2: a NaN loss in step 2's first micro-batch (forward call 3) throws away both micro-batches'
    gradients; the error names that micro-batch, and the last good state is step 1."""
    overrides = small("train.max_steps=3", "train.grad_accum=2", "train.batch_size=4")
    with monkeypatch.context() as patch, pytest.raises(NonFiniteLossError) as info:
        _nan_on_call(patch, 3)
        train("tiny", tiny_manifest, tmp_path / "stop", overrides=overrides)
    assert "non-finite loss at step 2" in str(info.value) and "micro-batch 0" in str(info.value)
    assert latest_checkpoint(tmp_path / "stop").name == "step-000001"

    _nan_on_call(monkeypatch, 3)
    run = tmp_path / "skip"
    result = train("tiny", tiny_manifest, run, overrides=[*overrides, "train.skip_nonfinite=true"])
    assert result.step == 3 and result.skipped_steps == 1
    records = {r["step"]: r for r in read_metrics(run, "train")}
    assert "loss" not in records[2] and isinstance(records[3]["loss"], float)
    assert records[3]["samples_seen"] == 3 * 2 * 4  # the skipped step read both of its micro-batches
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward (a finite loss whose gradients overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradient_norm_stops_after_saving_the_last_good_state(
    tiny_manifest: Path, tmp_path: Path, small, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nan_on_call(monkeypatch, 2, spoil=_InfiniteGradient.apply)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        train("tiny", tiny_manifest, run, overrides=small("train.max_steps=3"))
    message = str(info.value)
    assert "non-finite gradient norm at step 2" in message and "grad_norm" in message
    assert "'loss': nan" not in message  # the losses themselves were finite
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-000001"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_unreadable_image_mid_run_is_skipped_and_logged(
    tiny_manifest: Path, tmp_path: Path, small, capfd: pytest.CaptureFixture[str]
) -> None:
    broken = tiny_manifest.parent / "images" / "0002.png"  # a train image
    broken.write_bytes(b"this is not a png")
    run = tmp_path / "run"
    result = train("tiny", tiny_manifest, run, overrides=small("train.max_steps=3"))
    assert result.step == 3
    records = read_metrics(run, "train")
    # all 8 train samples are in every batch of 8: the broken one is dropped each time
    assert [r["dropped_samples"] for r in records] == [1, 2, 3]
    assert all(r["itc_global_batch"] == 7 for r in records)
    assert "0002.png" in capfd.readouterr().err


def test_existing_run_needs_resume_and_a_compatible_curriculum(
    tiny_manifest: Path, tmp_path: Path, small, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    train("tiny", tiny_manifest, run, overrides=small("train.max_steps=1"))
    with monkeypatch.context() as patch:
        patch.setattr(loop, "build_model", lambda config: pytest.fail("model built before the check"))
        with pytest.raises(ConfigError, match="pass --resume"):
            train("tiny", tiny_manifest, run, overrides=small("train.max_steps=2"))
        stages = "train.stages=[{name: other, steps: 2}]"
        with pytest.raises(ConfigError, match=r"trained with stages \['pretrain'\]"):
            train("tiny", tiny_manifest, run, resume=True, overrides=small(stages))
    # a longer schedule is allowed: the run continues where it stopped
    result = train("tiny", tiny_manifest, run, resume=True, overrides=small("train.max_steps=2"))
    assert result.step == 2 and [r["step"] for r in read_metrics(run, "train")] == [1, 2]
