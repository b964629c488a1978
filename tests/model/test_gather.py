"""gather_with_grad across two gloo processes: the forward concatenates the shards in rank order and the
backward gives each rank the gradient of the summed per-rank losses with respect to its own rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from medunifier.model.losses import gather_with_grad

WORLD, ROWS, DIM = 2, 3, 4


def _shards() -> torch.Tensor:
    return torch.randn(WORLD * ROWS, DIM, generator=torch.Generator().manual_seed(0))


def _rank_loss(local: torch.Tensor, everything: torch.Tensor, rank: int) -> torch.Tensor:
    """A contrastive-like loss: the local rows against every row, weighted so that each rank differs."""
    logits = local @ everything.T  # [ROWS, WORLD * ROWS]
    targets = torch.arange(ROWS) + rank * ROWS
    return (rank + 1.0) * torch.nn.functional.cross_entropy(logits, targets)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        local = _shards()[rank * ROWS:(rank + 1) * ROWS].clone().requires_grad_(True)
        gathered = gather_with_grad(local)
        _rank_loss(local, gathered, rank).backward()
        save_file({"gathered": gathered.detach(), "grad": local.grad}, Path(out_dir) / f"rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gather_matches_the_single_process_gradient(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")

    full = _shards().requires_grad_(True)
    total = sum(_rank_loss(full[r * ROWS:(r + 1) * ROWS], full, r) for r in range(WORLD))
    total.backward()
    for rank in range(WORLD):
        result = load_file(tmp_path / f"rank{rank}.safetensors")
        torch.testing.assert_close(result["gathered"], _shards())
        torch.testing.assert_close(result["grad"], full.grad[rank * ROWS:(rank + 1) * ROWS])


def test_gather_is_the_identity_on_one_process() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x
