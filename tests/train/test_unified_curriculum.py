"""The `unified` preset: UniMedVL's stage ratios through objective-routed mixtures, stage lengths from one budget."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from medunifier.config import ConfigError, load_config
from medunifier.data.dataset import MixtureSampler, make_mixture_sampler
from medunifier.data.manifest import Record
from medunifier.train.curriculum import resolve_stages, validate_stages

# UniMedVL's ratios (image-to-text / text-to-image / interleaved); stages 2 and 3 sum to 95 and 97
PAPER_RATIOS = {"foundation": (75, 25, 0), "instruction": (40, 45, 10), "unified": (37, 35, 25)}
TASKS = ("report", "vqa", "caption", "cls", "edit")


def _records() -> list[Record]:
    """Records of every task (no images: samplers read only task and source)."""
    counts = {"report": 60, "vqa": 20, "caption": 15, "cls": 15, "edit": 25}
    return [Record(id=f"{task}-{i}", image=f"{task}/{i}.png", task=task, source="synthcxr")
            for task, n in counts.items() for i in range(n)]


def _group(records: list[Record], index: int, objective: str) -> str:
    """Which UniMedVL group a draw belongs to."""
    if objective == "i2t":
        return "image-to-text"
    if objective == "t2i":
        return "text-to-image"
    assert objective == "all" and records[index].task == "edit"
    return "interleaved"


def test_each_stage_draws_the_renormalised_paper_ratios_in_single_group_batches() -> None:
    stages = resolve_stages(load_config("unified"))
    assert [s.name for s in stages] == list(PAPER_RATIOS)
    records = _records()
    validate_stages(stages, records)
    batch = 8
    for stage in stages:
        ratios = PAPER_RATIOS[stage.name]
        target = dict(zip(("image-to-text", "text-to-image", "interleaved"), (r / sum(ratios) for r in ratios)))
        draws = list(make_mixture_sampler(records, stage.mixture, seed=stage.index, num_samples=10_000,
                                          batch_size=batch))
        groups = [_group(records, i, o) for i, o in draws]
        share = {g: n / len(draws) for g, n in Counter(groups).items()}
        for name, expected in target.items():
            assert share.get(name, 0.0) == pytest.approx(expected, abs=0.02), (stage.name, name, share)
        # routed groups read report records only; each micro-batch holds one group
        assert {records[i].task for i, o in draws if o in ("i2t", "t2i")} == {"report"}
        for start in range(0, len(draws), batch):
            assert len({o for _, o in draws[start : start + batch]}) == 1
        # every process sees the same group at the same step
        ranks = [list(MixtureSampler(records, stage.mixture, seed=1, num_samples=400, num_replicas=2, rank=r,
                                     batch_size=batch)) for r in (0, 1)]
        for start in range(0, 400, batch):
            assert {o for _, o in ranks[0][start : start + batch]} == {o for _, o in ranks[1][start : start + batch]}


def test_stage_lengths_scale_with_the_budget() -> None:
    fractions = (0.5, 0.3, 0.2)
    for budget in (10, 1000, 50_000):
        stages = resolve_stages(load_config("unified", [f"train.max_steps={budget}"]))
        assert sum(s.steps for s in stages) == budget
        assert [s.start for s in stages] == [0, stages[0].steps, stages[0].steps + stages[1].steps]
        for stage, fraction in zip(stages, fractions):
            assert abs(stage.steps - fraction * budget) <= 1
    with pytest.raises(ConfigError, match=r"gets 0 of train\.max_steps=2"):
        load_config("unified", ["train.max_steps=2"])


def test_invalid_curricula_fail_at_load(small) -> None:
    def stages(text: str) -> list[str]:
        return small(f"train.stages=[{text}]")

    with pytest.raises(ConfigError, match=r"sum to 0\.9"):
        load_config("tiny", stages("{name: a, fraction: 0.5}, {name: b, fraction: 0.4}"))
    with pytest.raises(ConfigError, match="not a mix"):
        load_config("tiny", stages("{name: a, fraction: 0.5}, {name: b, steps: 4}"))
    with pytest.raises(ConfigError, match="exactly one of steps and fraction"):
        load_config("tiny", stages("{name: a, steps: 3, fraction: 1.0}"))
    with pytest.raises(ConfigError, match="prefix must be one of"):
        load_config("tiny", stages("{name: a, steps: 3, mixture: {'x2y:report': 1}}"))
    # a routed key whose objectives are all off in its stage would train nothing
    cfg = load_config("tiny", stages("{name: a, steps: 3, mixture: {'t2i:report': 1}, "
                                     "losses: {itc: 1, itm: 1, itg: 1, tig: 0}}"))
    with pytest.raises(ConfigError, match="trains only tig"):
        resolve_stages(cfg)
    # a routed key matches on the task or source after its prefix
    cfg = load_config("tiny", stages("{name: a, steps: 3, mixture: {'t2i:vqa': 1, 'i2t:report': 1}}"))
    with pytest.raises(ConfigError, match="t2i:vqa"):
        validate_stages(resolve_stages(cfg), [r for r in _records() if r.task == "report"])


def test_group_loss_weights_and_resume_at_a_batch_boundary() -> None:
    stage = resolve_stages(load_config("unified"))[1]
    assert stage.losses_for(["t2i"] * 4).enabled() == ["tig"]
    assert stage.losses_for(["i2t"] * 4).enabled() == ["itc", "itm", "itg"]
    assert stage.losses_for(["all", "all"]).enabled() == ["itc", "itm", "itg", "tig"]
    assert stage.losses_for(None) == stage.losses
    records = _records()
    full = list(make_mixture_sampler(records, stage.mixture, seed=3, num_samples=64, batch_size=8))
    sampler = make_mixture_sampler(records, stage.mixture, seed=3, num_samples=64, batch_size=8)
    sampler.load_state_dict({"epoch": 0, "position": 21, "seed": 3, "num_replicas": 1, "rank": 0})
    assert list(sampler) == full[16:]  # position 21 is inside batch 3: it resumes at its start


def test_routed_training_forwards_one_group_per_batch(tiny_manifest: Path, tmp_path: Path, small,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from medunifier.model.medunifier import MedUnifier
    from medunifier.train.loop import train
    from medunifier.train.metrics import read_metrics

    seen: list[tuple[set[str], tuple[str, ...]]] = []
    tig: list[float] = []
    original = MedUnifier.forward

    def recording_forward(self, batch, loss_weights=None):
        out = original(self, batch, loss_weights)
        if self.training:
            seen.append((set(batch["objectives"]), tuple(loss_weights.enabled())))
            if "tig" in out.losses:
                tig.append(float(out.losses["tig"].detach()))
        return out

    monkeypatch.setattr(MedUnifier, "forward", recording_forward)
    overrides = small("train.max_steps=4",
                      "train.stages=[{name: mixed, fraction: 1.0, mixture: {'i2t:report': 1, 't2i:report': 1}}]")
    train("tiny", tiny_manifest, tmp_path / "run", overrides=overrides)
    assert [groups for groups, _ in seen] == [{"i2t"}, {"t2i"}, {"i2t"}, {"t2i"}]  # 50/50: alternating
    assert all(losses == (("itc", "itm", "itg") if groups == {"i2t"} else ("tig",)) for groups, losses in seen)
    logged = {r["step"]: r for r in read_metrics(tmp_path / "run", "train")}
    assert "loss_itc" in logged[1] and "loss_tig" not in logged[1]
    assert "loss_tig" in logged[2] and "loss_itc" not in logged[2]
    assert logged[2]["loss_tig"] == pytest.approx(tig[0])

    # two micro-batches per step (one of each group): each loss is the mean over the micro-batches that had it
    seen.clear()
    tig.clear()
    train("tiny", tiny_manifest, tmp_path / "accum", overrides=[*overrides, "train.grad_accum=2"])
    assert [groups for groups, _ in seen] == [{"i2t"}, {"t2i"}] * 4
    logged = {r["step"]: r for r in read_metrics(tmp_path / "accum", "train")}
    assert logged[1]["loss_tig"] == pytest.approx(tig[0]) and "loss_itc" in logged[1]
