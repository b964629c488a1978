"""Training from streaming tar shards (exact resume too), and SIGTERM: checkpoint and exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medunifier.data.shards import write_shards
from medunifier.train.checkpoint import latest_checkpoint
from medunifier.train.loop import train
from medunifier.train.metrics import read_metrics


def test_a_folder_of_shards_trains_and_resumes_exactly(tiny_manifest: Path, tmp_path: Path, small) -> None:
    shards = tmp_path / "shards"
    write_shards(tiny_manifest, shards, shard_size=5)
    assert (shards / "shards.json").exists()
    overrides = small("train.max_steps=4", "train.val_every=2")
    straight = train("tiny", shards, tmp_path / "straight", overrides=overrides)
    assert straight.step == 4
    train("tiny", shards, tmp_path / "split", max_steps=2, overrides=overrides)
    state = json.loads((tmp_path / "split/checkpoints/step-000002/rank-0.json").read_text())
    assert state["data"] == {"epoch": 1, "batches": 1}  # 8 train samples = one batch per epoch
    train("tiny", shards, tmp_path / "split", resume=True, overrides=overrides)
    a = [r["loss"] for r in read_metrics(tmp_path / "straight", "train")]
    b = [r["loss"] for r in read_metrics(tmp_path / "split", "train")]
    assert len(a) == 4 and b == pytest.approx(a, rel=1e-5)
    assert [r["step"] for r in read_metrics(tmp_path / "straight", "val")] == [2, 4]


def test_sigterm_saves_a_checkpoint_and_exits_0(tiny_manifest: Path, tmp_path: Path, small, child_env) -> None:
    run = tmp_path / "run"
    command = [sys.executable, "-m", "medunifier.cli", "pretrain", "--config", "tiny", "--data", str(tiny_manifest),
               "--out", str(run), *small("train.max_steps=100000")]
    proc = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while len(read_metrics(run, "train")) < 2:  # it is training
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "SIGTERM" in output
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    steps = [r["step"] for r in read_metrics(run, "train")]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == steps[-1] >= 2
    assert not (run / "model").exists()  # an interrupted run is continued with --resume, not finalised
