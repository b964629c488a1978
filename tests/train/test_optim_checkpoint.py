"""Schedule, optimiser groups and the safetensors/JSON checkpoint format, on small stand-in modules."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medunifier.train.checkpoint import (
    capture_rng_state,
    flatten_optimizer_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unflatten_optimizer_state,
)
from medunifier.train.optim import WarmupCosineSchedule, build_optimizer, warmup_cosine_lr


class Net(nn.Module):
    """Linear layers, a norm, an embedding and a weight tied to it (like an LM head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.embed.weight
        self.drop = nn.Dropout(0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.drop(self.fc(self.embed(ids))))).logsumexp(-1).mean()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 10, (4, 5))
        loss = model(ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr() -> None:
    total, peak, start, floor = 100, 1e-3, 1e-5, 1e-6
    lrs = [warmup_cosine_lr(s, peak, total, 10, start, floor) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(start)
    assert np.allclose(np.diff(lrs[:11]), (peak - start) / 10)  # linear warm-up
    assert lrs[10] == pytest.approx(peak)
    assert (np.diff(lrs[10:]) <= 0).all()  # then never increases
    assert lrs[55] == pytest.approx(floor + (peak - floor) / 2)  # the cosine's midpoint
    assert lrs[total] == pytest.approx(floor)


def test_scheduler_sets_group_lrs_and_round_trips_through_json() -> None:
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = WarmupCosineSchedule(opt, peak_lr=1e-3, total_steps=40, warmup_ratio=0.25, warmup_start_lr=1e-4)
    assert sched.warmup_steps == 10
    for _ in range(7):
        sched.step()
    state = json.loads(json.dumps(sched.state_dict()))
    other_opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1.0)
    other = WarmupCosineSchedule(other_opt, peak_lr=5.0, total_steps=3)
    other.load_state_dict(state)
    assert other_opt.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 + (1e-3 - 1e-4) * 7 / 10)


def test_optimizer_uses_paper_betas_and_decays_by_tensor_rank() -> None:
    model = Net()
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names == {"fc.weight", "embed.weight"}  # matrices (the tied embedding too), not biases or norms
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups if any(p.ndim >= 2 for p in g["params"]))
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)


def test_every_matrix_and_kernel_of_the_model_decays_and_nothing_else() -> None:
    """On the real model with a trainable ResNet: the stem conv (`embedder.embedder.convolution`), embeddings
    and query tokens decay; biases, norms and the temperature do not; frozen parameters are left out."""
    from medunifier.config import load_config
    from medunifier.model.medunifier import MedUnifier
    from medunifier.train.optim import parameter_groups
    from shrunk_config import SMALL_MODEL

    model = MedUnifier(load_config("tiny", [*SMALL_MODEL, "vision.frozen=false"]))
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.05)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert set(decay) == {id(p) for p in params.values() if p.requires_grad}
    for name, p in params.items():
        assert decay[id(p)] == (0.05 if p.ndim >= 2 else 0.0), name
    stem = params["vision.backbone.embedder.embedder.convolution.weight"]
    assert stem.ndim == 4 and decay[id(stem)] == 0.05
    assert decay[id(params["encoder.query_tokens"])] == 0.05 and decay[id(params["temperature"])] == 0.0
    model.set_trainable(["encoder"])
    kept = {id(p) for g in parameter_groups(model, 0.05) for p in g["params"]}
    assert kept == {id(p) for n, p in params.items() if n.startswith("encoder")}


def test_lr_scale_multiplies_the_rate_of_the_named_parameters_at_every_step() -> None:
    model = Net()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, lr_scale={"fc": 3.0, "fc.bias": 0.5})
    schedule = WarmupCosineSchedule(opt, peak_lr=1e-3, total_steps=20, warmup_ratio=0.1, warmup_start_lr=1e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    for _ in range(7):
        schedule.step()
    base = schedule.lr_at(7)
    rates = {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rates["fc.weight"] == pytest.approx(3.0 * base)  # "fc" prefix
    assert rates["fc.bias"] == pytest.approx(0.5 * base)  # the longer prefix wins
    assert rates["norm.weight"] == pytest.approx(base) and rates["embed.weight"] == pytest.approx(base)
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {"fc.weight", "embed.weight"}  # splitting by rate keeps the decay split
    grouped = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())  # every parameter once


def test_lr_scale_with_a_prefix_that_names_nothing_fails() -> None:
    with pytest.raises(ValueError, match="genrator"):
        build_optimizer(Net(), lr=1e-3, weight_decay=0.05, lr_scale={"genrator": 3.0})
    with pytest.raises(ValueError, match="'f'"):  # a prefix is a module path, not the start of a name
        build_optimizer(Net(), lr=1e-3, weight_decay=0.05, lr_scale={"f": 3.0})


def test_optimizer_state_survives_the_safetensors_json_split() -> None:
    torch.manual_seed(0)
    model = Net()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05)
    _train(model, opt, 3)
    tensors, meta = flatten_optimizer_state(opt.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.dumps(meta)  # the remainder is plain JSON
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    fresh = build_optimizer(Net(), lr=1e-2, weight_decay=0.05)
    fresh.load_state_dict(restored)
    original = opt.state_dict()
    for index, entry in original["state"].items():
        for name, value in entry.items():
            assert torch.equal(fresh.state_dict()["state"][index][name], value)
    assert fresh.param_groups[0]["betas"] == original["param_groups"][0]["betas"]


def test_rng_state_round_trip_replays_python_numpy_and_torch() -> None:
    tensors, meta = capture_rng_state()
    meta = json.loads(json.dumps(meta))
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    restore_rng_state(tensors, meta)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_cuda_rng_states_are_restored_in_device_order(monkeypatch) -> None:
    """With 12 GPUs, device 2 gets cuda_2's state, not cuda_10's (a string sort puts cuda_10 first)."""
    tensors, meta = capture_rng_state()
    for i in range(12):
        tensors[f"cuda_{i}"] = torch.full((4,), i, dtype=torch.uint8)
    restored: list[list[int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 12)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append([int(s[0]) for s in states]))
    restore_rng_state(tensors, json.loads(json.dumps(meta)))
    assert restored == [list(range(12))]


def test_checkpoint_resume_continues_exactly_and_prunes(tmp_path: Path) -> None:
    """Train 6 steps straight, or 3 + save + load into fresh objects + 3: same losses and weights."""
    torch.manual_seed(0)
    straight = Net()
    opt = build_optimizer(straight, lr=1e-2, weight_decay=0.05)
    losses_straight = _train(straight, opt, 6)

    torch.manual_seed(0)
    model = Net()
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.05)
    first = _train(model, opt, 3)
    for step in (1, 2, 3):  # three checkpoints, keep the last two
        save_checkpoint(tmp_path, step, model, opt, {"note": "x"}, {"data": {"position": step}}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    files = {p.name for p in latest_checkpoint(tmp_path).iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json",
                     "rank-0.safetensors", "rank-0.json"}  # nothing pickled

    torch.manual_seed(123)  # scrambled RNG and fresh objects: everything must come from the checkpoint
    resumed = Net()
    opt2 = build_optimizer(resumed, lr=1e-2, weight_decay=0.05)
    state, rank_state = load_checkpoint(latest_checkpoint(tmp_path), resumed, opt2)
    assert state["step"] == 3 and state["note"] == "x" and rank_state["data"] == {"position": 3}
    second = _train(resumed, opt2, 3)
    assert first + second == pytest.approx(losses_straight, rel=0, abs=0)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.head.weight is resumed.embed.weight  # the tie survived loading


def test_incomplete_and_temporary_checkpoints_are_never_picked(tmp_path: Path) -> None:
    model = Net()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    save_checkpoint(tmp_path, 5, model, opt, {}, {})
    (tmp_path / "checkpoints" / ".tmp-step-000009").mkdir()  # a crash mid-write
    (tmp_path / "checkpoints" / "step-000007").mkdir()  # no trainer_state.json
    assert latest_checkpoint(tmp_path).name == "step-000005"
    save_checkpoint(tmp_path, 5, model, opt, {"again": True}, {})  # the same step twice replaces it
    assert json.loads((tmp_path / "checkpoints/step-000005/trainer_state.json").read_text())["again"]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "step-000007", model)
