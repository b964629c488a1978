"""Curriculum (UniMedVL): a run is a list of stages trained one after the other.

Each stage has its own length, data mixture (weights by task or source), loss weights, trainable
modules and peak learning rate (with its own warm-up + cosine schedule). A config without
`train.stages` is one stage named "pretrain" of `train.max_steps` steps over the whole train split.
Steps are counted globally: stage k covers global steps [start, start + steps). A stage's length is
its `steps`, or its `fraction` of `train.max_steps` (then `train.max_steps` is the run's one budget).

Objective routing: a mixture key "i2t:report" draws report records for the image-to-text objectives
only (the stage's ITC, ITM and ITG weights, TIG off), "t2i:report" for the text-to-image objective
only (TIG); such batches hold one group each (`MixtureSampler`) and `Stage.losses_for` gives their
loss weights. This is how UniMedVL's per-task data ratios (image-to-text / text-to-image / interleaved)
become a MedUnifier curriculum (`src/medunifier/configs/unified.yaml`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from medunifier.config import (
    ALL_OBJECTIVES,
    OBJECTIVE_GROUPS,
    ConfigError,
    LossWeights,
    MedUnifierConfig,
    split_mixture_key,
)
from medunifier.data.manifest import I2I_TASKS, Record


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    steps: int
    start: int  # global step at which the stage begins
    losses: LossWeights
    lr: float
    mixture: dict[str, float] = field(default_factory=dict)
    train_modules: list[str] | None = None

    @property
    def end(self) -> int:
        return self.start + self.steps

    def group_losses(self, group: str | None) -> LossWeights:
        """The stage's loss weights for one objective group ("i2t", "t2i", "i2i"; None or "all" = every objective)."""
        if group in (None, "all"):
            return self.losses
        keep = OBJECTIVE_GROUPS[group]
        return LossWeights(**{name: getattr(self.losses, name) if name in keep else 0.0 for name in ALL_OBJECTIVES})

    def losses_for(self, objectives: Sequence[str] | None) -> LossWeights:
        """Loss weights of a batch from its per-item objective groups (`batch["objectives"]`, absent for
        plain mixtures). A batch mixing groups (it cannot come from `MixtureSampler`) gets every objective."""
        groups = set(objectives or ())
        return self.group_losses(groups.pop() if len(groups) == 1 else None)


def resolve_stages(config: MedUnifierConfig) -> list[Stage]:
    """The config's stages with defaults filled in from the top-level losses and learning rate."""
    train = config.train
    if not train.stages:
        return [Stage(0, "pretrain", train.max_steps, 0, config.losses, train.lr)]
    stages, start = [], 0
    names = [s.name for s in train.stages]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"train.stages: duplicate stage names {duplicates}")
    for index, (spec, steps) in enumerate(zip(train.stages, train.stage_steps())):
        losses = spec.losses or config.losses
        if not losses.enabled():
            raise ConfigError(f"train.stages[{index}] ('{spec.name}'): every loss weight is 0")
        for key, weight in spec.mixture.items():
            group = split_mixture_key(key)[0]
            if group is not None and weight > 0 and not any(getattr(losses, n) > 0 for n in OBJECTIVE_GROUPS[group]):
                raise ConfigError(f"train.stages[{index}] ('{spec.name}'): mixture key '{key}' trains only "
                                  f"{'/'.join(OBJECTIVE_GROUPS[group])}, whose loss weights are all 0 in this stage")
        stages.append(
            Stage(
                index=index,
                name=spec.name,
                steps=steps,
                start=start,
                losses=losses,
                lr=spec.lr if spec.lr is not None else train.lr,
                mixture={k: float(w) for k, w in spec.mixture.items() if w > 0},
                train_modules=list(spec.train_modules) if spec.train_modules is not None else None,
            )
        )
        start += steps
    return stages


def total_steps(stages: Sequence[Stage]) -> int:
    return stages[-1].end if stages else 0


def stage_at(stages: Sequence[Stage], step: int) -> tuple[int, int]:
    """(stage index, step within the stage) of global step `step`; past the end: (len(stages), 0)."""
    for stage in stages:
        if step < stage.end:
            return stage.index, step - stage.start
    return len(stages), 0


def validate_stages(
    stages: Sequence[Stage], records: Sequence[Record], module_prefixes: Sequence[str] | None = None
) -> None:
    """Fail before any model is built when a mixture key matches no train record or a module name is unknown."""
    tasks = sorted({r.task for r in records})
    sources = sorted({r.source for r in records})
    for stage in stages:
        names = {k: split_mixture_key(k)[1] for k in stage.mixture}  # less the objective-group prefix
        unknown = [k for k, name in names.items() if name not in tasks and name not in sources]
        if unknown:
            raise ConfigError(
                f"stage '{stage.name}': mixture keys {unknown} match no task or source of the train split "
                f"(tasks: {tasks}, sources: {sources})"
            )
        for key, name in names.items():
            routed = split_mixture_key(key)[0] == "i2i"
            if routed and name not in I2I_TASKS:
                raise ConfigError(f"stage '{stage.name}': mixture key '{key}': 'i2i:' routes one of the image-to-image "
                                  f"tasks {list(I2I_TASKS)}, not '{name}'")
            if not routed and name in I2I_TASKS:
                raise ConfigError(f"stage '{stage.name}': mixture key '{key}': image-to-image records train only "
                                  f"with their own objective: write 'i2i:{name}'")
        if module_prefixes is not None and stage.train_modules is not None:
            bad = [m for m in stage.train_modules if not any(m.split(".")[0] == p for p in module_prefixes)]
            if bad:
                raise ConfigError(
                    f"stage '{stage.name}': train_modules {bad} name no module (top-level modules: "
                    f"{list(module_prefixes)})"
                )
