"""Exact resume: 40 steps straight == 20 steps, then a fresh call resuming to 40 (losses and weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from medunifier.train.checkpoint import list_checkpoints
from medunifier.train.loop import train
from medunifier.train.metrics import read_metrics


def _train_losses(run: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("loss") or k == "lr"}
            for r in read_metrics(run, "train")}


def test_resumed_run_matches_a_straight_run(tiny_manifest: Path, tmp_path: Path, small) -> None:
    # dropout on, dead-code restarts in the quantisers, ITM negatives sampled: all draw random numbers
    overrides = small("train.max_steps=40", "train.save_every=10", "train.val_every=10", "train.keep_last=2",
                      "encoder.dropout=0.1", "train.warmup_ratio=0.1")
    straight = train("tiny", tiny_manifest, tmp_path / "straight", overrides=overrides)
    assert straight.step == 40 and not straight.interrupted

    first = train("tiny", tiny_manifest, tmp_path / "split", max_steps=20, overrides=overrides)
    assert first.step == 20 and first.checkpoint.name == "step-000020"
    assert (tmp_path / "split" / "model" / "model.safetensors").exists()
    resumed = train("tiny", tiny_manifest, tmp_path / "split", resume=True, overrides=overrides)
    assert resumed.step == 40

    a, b = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 41))  # one record per step, none duplicated
    for step in range(1, 41):
        assert a[step].keys() == b[step].keys()
        for key, value in a[step].items():
            assert abs(value - b[step][key]) <= 1e-5 * max(1.0, abs(value)), (step, key, value, b[step][key])
    # the losses moved: this is not a comparison of two constant sequences
    assert a[40]["loss"] < a[1]["loss"]

    w_straight = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    w_split = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert w_straight.keys() == w_split.keys()
    for key in w_straight:
        torch.testing.assert_close(w_split[key], w_straight[key], rtol=1e-5, atol=1e-6, msg=key)

    # keep-last-2 in both runs; validation every 10 steps
    for run in ("straight", "split"):
        assert [p.name for p in list_checkpoints(tmp_path / run)] == ["step-000030", "step-000040"]
        val_steps = [r["step"] for r in read_metrics(tmp_path / run, "val")]
        assert {10, 20, 30, 40} <= set(val_steps)
    run = tmp_path / "split"
    assert (run / "config.yaml").exists() and (run / "loss_curves.png").stat().st_size > 1000


def test_augmented_run_resumes_exactly(tiny_manifest: Path, tmp_path: Path, small) -> None:
    """train.augment draws from the checkpointed CPU RNG: 8 steps straight == 4, stop, resume to 8."""
    overrides = small("train.max_steps=8", "train.save_every=4", "train.val_every=100", "train.warmup_ratio=0.1",
                      "train.augment.enabled=true", "train.augment.rotate_degrees=10")
    train("tiny", tiny_manifest, tmp_path / "straight", overrides=overrides)
    train("tiny", tiny_manifest, tmp_path / "split", max_steps=4, overrides=overrides)
    train("tiny", tiny_manifest, tmp_path / "split", resume=True, overrides=overrides)
    a, b = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        for key, value in a[step].items():
            assert abs(value - b[step][key]) <= 1e-5 * max(1.0, abs(value)), (step, key, value, b[step][key])

    # and the augmentation did change what the model saw: the first loss differs from an unaugmented run
    plain = [o for o in overrides if not o.startswith("train.augment")]
    train("tiny", tiny_manifest, tmp_path / "plain", max_steps=1, overrides=plain)
    assert abs(_train_losses(tmp_path / "plain")[1]["loss"] - a[1]["loss"]) > 1e-4
