"""The image-to-image objective: routed by "i2i:" mixture keys, on the frozen-encoder path with a feature cache,
training the encoder's passes it uses and its head, and nothing else."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from medunifier.config import ConfigError, LossWeights, load_config
from medunifier.data.dataset import Collator, ManifestDataset
from medunifier.data.synthcxr import write_synthcxr
from medunifier.model.medunifier import MedUnifier
from medunifier.train.curriculum import resolve_stages, validate_stages
from medunifier.train.features import write_feature_cache

I2I_STAGE = ('train.stages=[{name: i2i, steps: 3, mixture: {"i2i:translate": 1, "i2i:upscale": 1, '
             '"i2i:segment": 1}, losses: {itc: 0, itm: 0, itg: 0, tig: 0, i2i: 1}}]')


@pytest.fixture(scope="module")
def i2i_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("i2i")
    write_synthcxr(root, n=16, size=32, seed=2, workers=1, per_class_5x200=0, i2i=10)
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random frozen ResNet standing in for a stage-0 backbone."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                    layer_type="basic", downsample_in_first_stage=False)
    folder = tmp_path_factory.mktemp("backbone")
    transformers.ResNetModel(cfg).save_pretrained(str(folder))
    return folder


def _frozen(small: Callable[..., list[str]], backbone: Path, *extra: str) -> list[str]:
    return small(f"vision.pretrained={backbone}", "vision.backbone=resnet", "vision.frozen=true",
                 "i2i.enabled=true", "i2i.channels=8", *extra)


def test_the_objective_trains_only_the_encoder_passes_and_its_head(small, backbone: Path, i2i_data: Path) -> None:
    config = load_config("tiny_frozen", _frozen(small, backbone, I2I_STAGE))
    torch.manual_seed(0)
    model = MedUnifier(config)
    stage = resolve_stages(config)[0]
    model.set_trainable(stage.train_modules)
    data = ManifestDataset(i2i_data, image_size=32, channels=1, tasks=["translate", "upscale", "segment"])
    batch = Collator(model.tokenizer, max_length=32)([data[i] for i in range(8)])
    assert batch["i2i_targets"].shape == batch["pixel_values"].shape == (8, 1, 32, 32)
    assert batch["i2i_masks"].shape == (8, 1, 32, 32) and set(batch["i2i_masks"].unique().tolist()) <= {0.0, 1.0}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    weights = stage.group_losses("i2i")
    assert weights == LossWeights(itc=0, itm=0, itg=0, tig=0, i2i=1)
    model.train()
    for _ in range(2):  # the FiLM layers start at zero: the encoder's gradient arrives from the second step
        out = model(batch, loss_weights=weights)
        assert set(out.losses) == {"i2i", "i2i_mse", "i2i_dice"} and torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"i2i", "encoder"}
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # codebooks, BatchNorm stats
    images, masks = model.image_to_image(batch["pixel_values"][:3], ["upscale x4", "suppress the bones",
                                                                     "outline the heart"])
    assert images.shape == (3, 1, 32, 32) and masks.shape == (3, 1, 32, 32)
    assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0


def test_i2i_records_need_their_own_key_and_batch(small, backbone: Path, i2i_data: Path) -> None:
    from medunifier.data.manifest import load_records

    records = [r for r in load_records(i2i_data) if r.split == "train"]
    plain = load_config("tiny_frozen", _frozen(small, backbone, 'train.stages=[{name: s, steps: 2, mixture: '
                                                                '{"upscale": 1}}]'))
    with pytest.raises(ConfigError, match="write 'i2i:upscale'"):
        validate_stages(resolve_stages(plain), records)
    with pytest.raises(ValueError, match=r"i2i\.enabled=true"):
        load_config("tiny_frozen", small(I2I_STAGE))
    model = MedUnifier(load_config("tiny_frozen", _frozen(small, backbone)))
    data = ManifestDataset(i2i_data, image_size=32, channels=1, tasks=["upscale"])
    batch = Collator(model.tokenizer, max_length=32)([data[i] for i in range(2)])
    with pytest.raises(ValueError, match="'i2i:' mixture keys"):
        model(batch)  # ITC, ITM, ITG and TIG are on: instructions are no reports


def test_pretrain_routes_i2i_batches_through_the_feature_cache(small, backbone: Path, i2i_data: Path,
                                                               tmp_path: Path) -> None:
    from medunifier.train.loop import train

    cache = tmp_path / "cache"
    write_feature_cache(load_config("tiny_frozen", _frozen(small, backbone)), i2i_data, cache, progress=False)
    overrides = _frozen(small, backbone, f"vision.feature_cache={cache}",
                        'train.stages=[{name: mixed, steps: 4, mixture: {"report": 1, "i2i:upscale": 1, '
                        '"i2i:segment": 1}, losses: {i2i: 1}}]')
    result = train("tiny_frozen", i2i_data, tmp_path / "run", overrides=overrides)
    assert result.step == 4
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x and x.get("split", "train") == "train"]
    assert any("loss_i2i" in x for x in steps) and any("loss_itc" in x for x in steps)
    assert not any("loss_i2i" in x and "loss_itc" in x for x in steps)  # one objective group per batch
    reloaded = MedUnifier.from_pretrained(tmp_path / "run")
    assert reloaded.i2i is not None
