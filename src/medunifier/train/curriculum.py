"""Curriculum (UniMedVL): a run is a list of stages trained one after the other.

Each stage has its own length, data mixture (weights by task or source), loss weights, trainable
modules and peak learning rate (with its own warm-up + cosine schedule). A config without
`train.stages` is one stage named "pretrain" of `train.max_steps` steps over the whole train split.
Steps are counted globally: stage k covers global steps [start, start + steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from medunifier.config import ConfigError, LossWeights, MedUnifierConfig
from medunifier.data.manifest import Record


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
    for index, spec in enumerate(train.stages):
        losses = spec.losses or config.losses
        if not losses.enabled():
            raise ConfigError(f"train.stages[{index}] ('{spec.name}'): every loss weight is 0")
        stages.append(
            Stage(
                index=index,
                name=spec.name,
                steps=spec.steps,
                start=start,
                losses=losses,
                lr=spec.lr if spec.lr is not None else train.lr,
                mixture={k: float(w) for k, w in spec.mixture.items() if w > 0},
                train_modules=list(spec.train_modules) if spec.train_modules is not None else None,
            )
        )
        start += spec.steps
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
        unknown = [k for k in stage.mixture if k not in tasks and k not in sources]
        if unknown:
            raise ConfigError(
                f"stage '{stage.name}': mixture keys {unknown} match no task or source of the train split "
                f"(tasks: {tasks}, sources: {sources})"
            )
        if module_prefixes is not None and stage.train_modules is not None:
            bad = [m for m in stage.train_modules if not any(m.split(".")[0] == p for p in module_prefixes)]
            if bad:
                raise ConfigError(
                    f"stage '{stage.name}': train_modules {bad} name no module (top-level modules: "
                    f"{list(module_prefixes)})"
                )
