"""Stage 0 as the teacher of stage 1's ITC (`itc_distill`): the targets it mixes in, the embeddings it reads
off a real stage-0 run, and a training run that uses it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_stage0 import STAGE0_SMALL

from medunifier.config import ConfigError, load_config, load_stage0_config
from medunifier.data.dataset import ManifestDataset
from medunifier.model.losses import ContrastiveLogits, itc_loss, itc_teacher_targets, mix_itc_targets
from medunifier.model.stage0 import ImageTower, TextTower
from medunifier.model.vision import VisionEncoder
from medunifier.train.data import resolve_data
from medunifier.train.stage0 import pretrain_vision
from medunifier.train.teacher import TEXT_CACHE, ItcTeacherTargets


@pytest.fixture(scope="module")
def stage0(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short image-text stage 0 (locked MiniLM): its output folder, with stage0/ inside."""
    out = tmp_path_factory.mktemp("stage0")
    pretrain_vision(load_stage0_config(None, [*STAGE0_SMALL, "max_steps=3", "soft_targets=true"]), synth, out,
                    progress=False)
    return out


def _teacher_config(stage0: Path, *extra: str):
    return load_config("tiny_frozen", ["image.size=32", f"vision.pretrained={stage0}", "itc_distill=0.4", *extra])


def test_mixed_targets_and_the_teachers_fixed_point() -> None:
    torch.manual_seed(0)
    t_image = 10.0 * F.normalize(torch.randn(4, 6), dim=-1)  # scaled by a logit scale of 10
    t_text = F.normalize(torch.randn(4, 6), dim=-1)
    teacher = itc_teacher_targets(t_image, t_text)
    torch.testing.assert_close(teacher[0], (t_image @ t_text.t()).softmax(-1))
    torch.testing.assert_close(teacher[1], (t_text @ t_image.t()).softmax(-1))

    def student(i2t: torch.Tensor, t2i: torch.Tensor) -> ContrastiveLogits:
        return ContrastiveLogits(i2t.clone().requires_grad_(), t2i.clone().requires_grad_(), torch.arange(4), 4)

    logits = student(torch.randn(4, 4), torch.randn(4, 4))
    assert torch.equal(mix_itc_targets(None, logits, teacher, 0.0)[0], torch.eye(4))
    mixed = mix_itc_targets(None, logits, teacher, 0.4)
    torch.testing.assert_close(mixed[1], 0.6 * torch.eye(4) + 0.4 * teacher[1])
    torch.testing.assert_close(mixed[0].sum(-1), torch.ones(4))
    soft = torch.full((4, 4), 0.25)
    torch.testing.assert_close(mix_itc_targets(soft, logits, teacher, 0.5)[0], 0.5 * soft + 0.5 * teacher[0])
    with pytest.raises(ValueError, match="share"):
        mix_itc_targets(None, logits, teacher, 1.5)

    # all teacher: the loss is stationary where the student's logits are the teacher's, and not with hard targets
    at_teacher = student(t_image @ t_text.t(), t_text @ t_image.t())
    itc_loss(at_teacher, mix_itc_targets(None, at_teacher, teacher, 1.0))[0].backward()
    assert at_teacher.i2t.grad.abs().max() < 1e-6 and at_teacher.t2i.grad.abs().max() < 1e-6
    hard = student(t_image @ t_text.t(), t_text @ t_image.t())
    itc_loss(hard, mix_itc_targets(None, hard, teacher, 0.0))[0].backward()
    assert hard.i2t.grad.abs().max() > 1e-3


def test_teacher_reads_what_stage0_computes(stage0: Path, synth: Path, tmp_path: Path) -> None:
    config = _teacher_config(stage0)
    assert config.itc_teacher_folder == stage0 / "stage0"
    records = resolve_data(synth).train_records
    said: list[str] = []
    targets = ItcTeacherTargets.build(config, records, tmp_path, said.append)
    # the stage-0 run's report embeddings were reused (nothing embedded): the copy is theirs, byte for byte
    assert not any("embedded" in s for s in said)
    assert (tmp_path / TEXT_CACHE).read_bytes() == (stage0 / "stage0" / "text_embeddings.safetensors").read_bytes()
    (tmp_path / "other").mkdir()
    ItcTeacherTargets.build(config, records[:-1], tmp_path / "other", said.append)  # other reports: computed
    assert any("embedded" in s for s in said)

    dataset = ManifestDataset(synth, image_size=32, channels=1, splits=["train"])
    items = [dataset[i] for i in range(6)]
    pixels = torch.stack([it["pixel_values"] for it in items])
    batch = {"ids": [it["id"] for it in items], "pixel_values": pixels}
    encoder = VisionEncoder(config.vision, config.image)
    image, text = targets.annotate(batch, encoder, None)["itc_teacher"]

    # the reference: stage 0's own towers, as `eval.stage0` rebuilds them
    s0 = load_stage0_config(None, STAGE0_SMALL)
    heads = load_file(str(stage0 / "stage0" / "heads.safetensors"))
    tower = ImageTower(s0.vision.model_copy(update={"pretrained": str(stage0)}), s0.image, 384, s0.embed_dim)
    tower.load_state_dict({k[len("tower."):]: v for k, v in heads.items() if k.startswith("tower.")}, strict=False)
    scale = heads["itc.logit_scale"].exp()
    with torch.no_grad():
        expected_image = scale * F.normalize(tower.image_proj(tower.pooled(pixels)), dim=-1)
        texts = [it["text"] for it in items]
        expected_text = F.normalize(tower.text_proj(TextTower("minilm", max_length=64)(texts)), dim=-1)
    torch.testing.assert_close(image, expected_image, atol=1e-4, rtol=1e-4)
    # the cached embeddings may be computed under bf16: the same directions to within its precision
    assert bool(((text * expected_text).sum(-1) > 0.99).all())
    # a sample outside the training reports leaves the batch to the ITC targets alone
    assert "itc_teacher" not in targets.annotate({**batch, "ids": ["elsewhere", *batch["ids"][1:]]}, encoder, None)


def test_teacher_options_are_checked_up_front(stage0: Path, synth: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="frozen"):
        _teacher_config(stage0, "vision.frozen=false")
    with pytest.raises(ConfigError, match="teacher"):
        load_config("tiny_frozen", ["image.size=32", "itc_distill=0.4"])
    with pytest.raises(ConfigError, match="itc_distill"):
        load_config("tiny_frozen", ["image.size=32", "itc_distill=1.0"])
    records = resolve_data(synth).train_records
    with pytest.raises(FileNotFoundError, match="pretrain-vision"):
        ItcTeacherTargets.build(_teacher_config(stage0, f"itc_teacher={tmp_path}"), records, tmp_path)
    image_only = tmp_path / "image_only"
    pretrain_vision(load_stage0_config(None, [*STAGE0_SMALL, "max_steps=1", "objective=image"]), synth, image_only,
                    progress=False)
    with pytest.raises(ValueError, match="image-text stage 0"):
        ItcTeacherTargets.build(_teacher_config(image_only), records, tmp_path)


def test_training_with_the_teacher(small, stage0: Path, synth: Path, tmp_path: Path) -> None:
    from medunifier.train.loop import train

    overrides = small(f"vision.pretrained={stage0}", "vision.backbone=resnet", "vision.frozen=true",
                      "itc_distill=0.4", "itc_targets=findings", "train.max_steps=3")
    result = train("tiny_frozen", synth, tmp_path / "run", overrides=overrides)
    assert result.step == 3
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x.get("kind") == "train"]
    assert steps and all(x.get("itc_distilled") == 1.0 for x in steps)
