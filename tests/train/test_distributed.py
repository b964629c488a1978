"""Two processes under torchrun (gloo on CPU): global ITC batch, identical weights, distinct data per rank."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medunifier.data.shards import write_shards
from medunifier.train.metrics import read_metrics


def _torchrun(data: Path, run: Path, overrides: list[str], env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "medunifier.cli", "pretrain", "--config", "tiny", "--data", str(data), "--out", str(run),
               *overrides]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "batch"), [("manifest", 4), ("shards", 2)])
def test_two_processes_share_the_itc_batch_and_stay_identical(
    source: str, batch: int, tiny_manifest: Path, tmp_path: Path, small, child_env
) -> None:
    data = tiny_manifest
    if source == "shards":
        # 12 one-sample shards, 6 per rank in a shuffled order: at least 2 of each rank's are train samples
        data = tmp_path / "shards"
        write_shards(tiny_manifest, data, shard_size=1)
    run = tmp_path / "run"
    _torchrun(data, run, small("train.max_steps=3", f"train.batch_size={batch}", "train.val_every=3"), child_env)

    records = read_metrics(run, "train")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["itc_global_batch"] == 2 * batch for r in records)  # negatives from both processes
    assert all(r["samples_seen"] == 2 * batch * r["step"] for r in records)
    ranks = [json.loads((run / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    first = [set(r["first_sample_ids"][:batch]) for r in ranks]  # the first batch of each process
    assert len(first[0]) == len(first[1]) == batch and not first[0] & first[1]
    assert (run / "model" / "model.safetensors").exists()
    assert read_metrics(run, "val") and (run / "checkpoints" / "step-000003" / "rank-1.json").exists()
