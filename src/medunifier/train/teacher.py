"""Stage 0 as the teacher of stage 1's ITC (`itc_distill`).

An image-text stage 0 aligns the pooled backbone features with a locked pretrained text encoder (MiniLM);
stage 1's Q-Former learns its text side from scratch on the same reports. `ItcTeacherTargets` puts the
stage-0 view of every training batch beside it: the teacher's image embeddings from the frozen backbone's
features (read from the feature cache like the model's own), and its text embeddings from a table built
once at the start (the locked encoder's report embeddings, reused from the stage-0 run when they were
computed for the same reports and weights). `MedUnifier.forward` mixes the teacher's softmax into the ITC
targets (`model.losses.mix_itc_targets`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medunifier.config import MedUnifierConfig, Stage0Config
from medunifier.data.manifest import IMAGE_TEXT_TASKS, Record
from medunifier.model.stage0 import ItcTeacher, TextTower
from medunifier.model.vision import VisionEncoder
from medunifier.train.stage0 import TextBank

__all__ = ["ItcTeacherTargets"]

TEXT_CACHE = "teacher_text_embeddings.safetensors"  # in the stage-1 run folder


class ItcTeacherTargets:
    """Adds `batch["itc_teacher"]` = (image [B, E] times the teacher's logit scale, text [B, E]) to a batch.

    Args:
        teacher: stage 0's frozen projections.
        rows: record id -> row of `text_table`.
        text_table: [N, E] the teacher's normalised text embeddings of the training reports.
    """

    def __init__(self, teacher: ItcTeacher, rows: dict[str, int], text_table: Tensor):
        self.teacher = teacher
        self.rows = rows
        self.text_table = text_table

    @classmethod
    def build(cls, config: MedUnifierConfig, records: Sequence[Record], run_dir: Path,
              say: Callable[[str], Any] = print) -> ItcTeacherTargets:
        """The teacher of `config.itc_teacher_folder` for the report records among `records` (the training
        split). The locked encoder's embeddings are cached in `run_dir`; the stage-0 run's own cache is
        copied there first, so a stage 1 on stage 0's reports computes nothing."""
        folder = config.itc_teacher_folder
        if folder is None:
            raise ValueError("itc_distill is 0: no teacher to build")
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: itc_teacher (default vision.pretrained/stage0) must "
                                    "be the stage-0 run folder of `medunifier pretrain-vision`, or set itc_distill=0")
        stage0 = Stage0Config.model_validate(json.loads(config_file.read_text()))
        if stage0.objective not in ("text", "both") or stage0.text_tower != "locked":
            raise ValueError(f"{folder}: stage 0 trained with objective={stage0.objective}, "
                             f"text_tower={stage0.text_tower}; the ITC teacher needs an image-text stage 0 with "
                             "a locked text tower (set itc_distill=0)")
        if stage0.vision.backbone != config.vision.backbone:
            raise ValueError(f"{folder}: stage 0 trained a {stage0.vision.backbone} backbone, this run has "
                             f"vision.backbone={config.vision.backbone}")
        teacher = ItcTeacher.from_run(folder)
        reports = [r for r in records if r.text and r.task in IMAGE_TEXT_TASKS]
        if not reports:
            raise ValueError("itc_distill needs report records in the training split (image-text tasks with text)")
        cache = run_dir / TEXT_CACHE
        source = folder / "text_embeddings.safetensors"
        if not cache.exists() and source.exists():
            shutil.copyfile(source, cache)
            if source.with_suffix(".json").exists():
                shutil.copyfile(source.with_suffix(".json"), cache.with_suffix(".json"))
        tower = TextTower(stage0.text_encoder, max_length=stage0.text_max_length)
        if tower.width != teacher.text_width:
            raise ValueError(f"{folder}: the text projection takes width {teacher.text_width}, the text encoder "
                             f"{stage0.text_encoder} gives {tower.width}")
        bank = TextBank.build(reports, tower, cache, stage0.text_encoder, say)
        rows = {r.id: bank.index[r.text] for r in reports}
        return cls(teacher, rows, teacher.text(bank.embeddings))

    def to(self, device: torch.device) -> ItcTeacherTargets:
        """Move the projections and the text table to `device` (once, before training)."""
        self.teacher.to(device)
        self.text_table = self.text_table.to(device)
        return self

    def annotate(self, batch: dict[str, Any], vision: VisionEncoder, cache_keys: list[str] | None) -> dict[str, Any]:
        """The batch with `itc_teacher` added; unchanged when a sample has no teacher text (not a training
        report), so such a batch trains on the ITC targets alone."""
        rows = [self.rows.get(i) for i in batch["ids"]]
        if any(r is None for r in rows):
            return batch
        pixels = batch["pixel_values"]  # [B, C, S, S], on the device `to` moved the teacher to
        with torch.no_grad():
            image = self.teacher.image(vision.backbone_features(pixels, cache_keys))  # [B, E], scaled
        text = self.text_table[torch.tensor(rows, device=self.text_table.device)]  # [B, E]
        return {**batch, "itc_teacher": (image, text)}
