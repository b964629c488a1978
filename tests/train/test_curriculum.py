"""A 2-stage curriculum: per-stage mixture, loss weights, trainable modules and lr; boundary checkpoint; resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from medunifier.config import load_config
from medunifier.model.medunifier import MedUnifier
from medunifier.train.checkpoint import list_checkpoints
from medunifier.train.curriculum import resolve_stages, stage_at
from medunifier.train.loop import train
from medunifier.train.metrics import read_metrics

STAGES = (
    "train.stages=["
    "{name: align, steps: 3, mixture: {report: 1}, losses: {itc: 1, itm: 0, itg: 0, tig: 0},"
    " train_modules: [encoder, image_proj, text_proj, temperature], lr: 0.002},"
    "{name: generate, steps: 3, mixture: {vqa: 1, report: 1}, losses: {itc: 0, itm: 0, itg: 1, tig: 1}}]"
)


def test_stage_lookup(small) -> None:
    stages = resolve_stages(load_config("tiny", small(STAGES)))
    assert [(s.name, s.start, s.end, s.lr) for s in stages] == [("align", 0, 3, 0.002), ("generate", 3, 6, 1e-3)]
    assert [stage_at(stages, s) for s in (0, 2, 3, 5, 6)] == [(0, 0), (0, 2), (1, 0), (1, 2), (2, 0)]


def test_two_stage_curriculum_and_resume_inside_the_second_stage(
    tiny_manifest: Path, tmp_path: Path, small, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[str], tuple[str, ...]]] = []  # (tasks of the batch, enabled losses) per training forward
    original = MedUnifier.forward

    def recording_forward(self, batch, loss_weights=None):
        if self.training:
            seen.append((list(batch["tasks"]), tuple(loss_weights.enabled())))
        return original(self, batch, loss_weights)

    monkeypatch.setattr(MedUnifier, "forward", recording_forward)
    overrides = small(STAGES)
    straight = tmp_path / "straight"
    result = train("tiny", tiny_manifest, straight, overrides=overrides)
    assert result.step == 6 and result.stage == "generate"

    # data mixture and loss weights per stage
    assert all(tasks == ["report"] * 8 and losses == ("itc",) for tasks, losses in seen[:3])
    assert all(losses == ("itg", "tig") for _, losses in seen[3:])
    assert any("vqa" in tasks for tasks, _ in seen[3:])
    records = {r["step"]: r for r in read_metrics(straight, "train")}
    assert [records[s]["stage"] for s in range(1, 7)] == ["align"] * 3 + ["generate"] * 3
    assert "loss_itc" in records[1] and "loss_itg" not in records[1]
    assert "loss_itg" in records[4] and "loss_tig" in records[4] and "loss_itc" not in records[4]
    # each stage has its own peak lr (no warm-up at 5% of 3 steps)
    assert records[1]["lr"] == pytest.approx(0.002) and records[4]["lr"] == pytest.approx(1e-3)

    # the stage boundary wrote a checkpoint even though save_every is large
    assert [p.name for p in list_checkpoints(straight)] == ["step-000003", "step-000006"]
    boundary = json.loads((straight / "checkpoints/step-000003/trainer_state.json").read_text())
    assert boundary["stage_index"] == 1 and boundary["stage_name"] == "generate"

    # train_modules: the vision encoder did not move in stage 1, the encoder did; stage 2 trains all
    set_seed(0)
    initial = MedUnifier(load_config("tiny", overrides)).state_dict()
    at_boundary = load_file(str(straight / "checkpoints/step-000003/model.safetensors"))
    at_end = load_file(str(straight / "checkpoints/step-000006/model.safetensors"))
    vision_keys = [k for k in at_boundary if k.startswith("vision.") and at_boundary[k].is_floating_point()]
    assert vision_keys and all(torch.equal(at_boundary[k], initial[k]) for k in vision_keys)
    assert any(not torch.equal(at_end[k], initial[k]) for k in vision_keys)
    assert not torch.equal(at_boundary["encoder.query_tokens"], initial["encoder.query_tokens"])

    # stop inside stage 2, resume: lands in stage 2 at the right data position
    split = tmp_path / "split"
    train("tiny", tiny_manifest, split, max_steps=4, overrides=overrides)
    state = json.loads((split / "checkpoints/step-000004/trainer_state.json").read_text())
    assert state["stage_index"] == 1 and state["scheduler"]["step_count"] == 1
    seen.clear()
    train("tiny", tiny_manifest, split, resume=True, overrides=overrides)
    assert [losses for _, losses in seen] == [("itg", "tig")] * 2
    resumed = {r["step"]: r for r in read_metrics(split, "train")}
    for step in (5, 6):
        assert resumed[step]["stage"] == "generate"
        assert resumed[step]["loss"] == pytest.approx(records[step]["loss"], rel=1e-5)
