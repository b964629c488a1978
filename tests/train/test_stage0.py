"""Stage 0 (`pretrain-vision`) and the disk feature cache (`data features`), on real SynthCXR images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medunifier.config import ConfigError, ImageConfig, VisionConfig, load_config, load_stage0_config
from medunifier.data.dataset import ManifestDataset
from medunifier.data.manifest import Record
from medunifier.model.feature_cache import DiskFeatureCache, FeatureCacheMismatch
from medunifier.model.stage0 import ImageTextContrastiveLoss, TextTower, same_labels
from medunifier.model.vision import VisionEncoder
from medunifier.train.features import write_feature_cache
from medunifier.train.stage0 import (
    Stage0Model,
    TextBank,
    _collate_with_keys,
    join_texts_by_image,
    pretrain_vision,
)

STAGE0_SMALL = ["image.size=32", "vision.hidden_size=32", "vision.num_layers=2", "vision.patch_size=8",
                "embed_dim=16", "batch_size=8", "queue_size=16", "text_max_length=64",
                "log_every=1"]


@pytest.fixture(scope="module")
def text_tower() -> TextTower:
    return TextTower("minilm", max_length=64)


def _batch(manifest: Path, bank: TextBank | None, n: int = 16) -> dict:
    dataset = ManifestDataset(manifest, image_size=32, channels=1, splits=["train"])
    return _collate_with_keys(bank)([dataset[i] for i in range(n)])


@pytest.mark.parametrize("objective", ["text", "image"])
def test_stage0_lowers_its_loss_on_a_real_batch(synth: Path, text_tower: TextTower, tmp_path: Path,
                                                objective: str) -> None:
    config = load_stage0_config(None, [*STAGE0_SMALL, f"objective={objective}", "soft_targets=true"])
    torch.manual_seed(0)
    dataset = ManifestDataset(synth, image_size=32, channels=1, splits=["train"])
    bank = TextBank.build(dataset.records, text_tower, tmp_path / "emb.safetensors", "minilm") if objective == "text" else None
    model = Stage0Model(config, text_tower if objective == "text" else None)
    batch = _batch(synth, bank)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same augmented views every step: a fixed problem to fit
        loss = model(batch, bank, None)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_text_bank_is_cached_and_locked(synth: Path, text_tower: TextTower, tmp_path: Path) -> None:
    dataset = ManifestDataset(synth, image_size=32, channels=1, splits=["train"])
    cache = tmp_path / "emb.safetensors"
    first = TextBank.build(dataset.records, text_tower, cache, "minilm")
    assert first.embeddings.shape == (len(first.texts), text_tower.width)
    assert len(set(first.texts)) == len(first.texts)
    # the cached embeddings are the tower's own, and a second build reads them back
    # (computed under bf16 where the CPU has it natively: the same directions to within its precision)
    cosine = (first.embeddings[:3] * text_tower(first.texts[:3])).sum(-1)
    assert bool((cosine > 0.995).all()), cosine
    stamp = cache.stat().st_mtime_ns
    again = TextBank.build(dataset.records, text_tower, cache, "minilm")
    assert cache.stat().st_mtime_ns == stamp and torch.equal(again.embeddings, first.embeddings)
    assert not any(p.requires_grad for p in text_tower.parameters())


def test_question_answer_pairs_of_one_image_become_its_one_text() -> None:
    """A VQA source's records of one image read as one description (else each is the others' false negative)."""
    def rec(i: int, image: str | None, text: str) -> Record:
        return Record(id=f"r{i}", image=image, text=text, split="train")

    records = [rec(0, "a.png", "Question: Is it the brain? Answer: yes"), rec(1, "b.png", "Question: Organ? Answer: lung"),
               rec(2, "a.png", "Question: Modality? Answer: MRI"), rec(3, None, "a text without an image"),
               rec(4, "a.png", "Question: Is it the brain? Answer: yes"), rec(5, "c.png", "")]
    joined = join_texts_by_image(records)
    assert [r.id for r in joined] == ["r0", "r1", "r3", "r5"]  # the first record of each image, in order
    assert joined[0].text == "Question: Is it the brain? Answer: yes Question: Modality? Answer: MRI"  # no repeats
    assert joined[1].text == records[1].text and joined[3].text == ""
    assert records[0].text == "Question: Is it the brain? Answer: yes"  # the input is not modified
    assert join_texts_by_image(joined) == joined


def test_contrastive_soft_targets_and_queue() -> None:
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert same_labels(labels, labels).tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    unknown = torch.tensor([[-1.0, -1.0]])
    assert not same_labels(unknown, labels).any()
    emb = torch.nn.functional.normalize(torch.eye(3), dim=-1)
    keys = torch.arange(3)
    hard = ImageTextContrastiveLoss(0.07, soft_targets=False)
    soft = ImageTextContrastiveLoss(0.07, soft_targets=True)
    # samples 0 and 1 share their findings: with soft targets their cross similarity is no error
    loss_hard, _ = hard(emb, emb, keys, labels)
    loss_soft, _ = soft(emb, emb, keys, labels)
    assert loss_soft > loss_hard  # the target spreads over two texts, the logits favour one
    queue = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    loss_q, _ = hard(emb, emb, keys, labels, queue, torch.arange(3, 8), torch.zeros(5, 2))
    assert loss_q > loss_hard  # more negatives, a harder problem


def test_pretrain_vision_round_trips_through_vision_pretrained(synth: Path, tmp_path: Path) -> None:
    config = load_stage0_config(None, [*STAGE0_SMALL, "max_steps=4", "save_every=2"])
    out = tmp_path / "stage0"
    result = pretrain_vision(config, synth, out, progress=False)
    assert result.step == 4
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (out / name).exists(), name
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 32, "width": 32} and pre["image_mean"] == [0.5]  # one channel: the grey backbone
    saved = load_file(str(out / "model.safetensors"))
    trained = load_file(str(out / "stage0" / "checkpoints" / "step-000004" / "model.safetensors"))
    vision = VisionConfig(backbone="resnet", pretrained=str(out), patch_size=8, frozen=True)
    encoder = VisionEncoder(vision, ImageConfig(size=32, channels=1))
    for name, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, saved[name]), name
        assert torch.equal(value, trained[f"tower.backbone.{name}"]), name
    # resume: a run stopped after step 2 and resumed ends where the straight run ended
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "stage0", resumed / "stage0")
    shutil.rmtree(resumed / "stage0" / "checkpoints" / "step-000004")
    pretrain_vision(config, synth, resumed, resume=True, progress=False)
    again = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(again[k], saved[k]) for k in saved)


def test_stage0_config_refuses_what_cannot_run() -> None:
    with pytest.raises(ConfigError, match="frozen"):
        load_stage0_config(None, ["vision.frozen=true"])
    with pytest.raises(ConfigError, match="queue_size"):
        load_stage0_config(None, ["text_tower=finetune"])
    with pytest.raises(ConfigError, match="objective"):
        load_stage0_config(None, ["objective=captions"])


# ------------------------------------------------------------------------------------- feature cache


def _frozen_config(folder: Path, *extra: str):
    return load_config("tiny_frozen", ["image.size=32", f"vision.pretrained={folder}", *extra])


@pytest.fixture(scope="module")
def backbone_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import transformers

    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                        layer_type="basic", downsample_in_first_stage=False)
        folder = tmp_path_factory.mktemp(f"backbone{seed}")
        transformers.ResNetModel(cfg).save_pretrained(str(folder))
        dirs.append(folder)
    return dirs[0], dirs[1]


def test_feature_cache_hit_returns_what_the_backbone_computes(synth: Path, backbone_dirs, tmp_path: Path) -> None:
    config = _frozen_config(backbone_dirs[0])
    cache = tmp_path / "cache"
    summary = write_feature_cache(config, synth, cache, shard_size=16, progress=False)
    assert summary["entries"] == 40 and summary["shards"] == 3
    dataset = ManifestDataset(synth, image_size=32, channels=1, hash_images=True)
    items = [dataset[i] for i in range(6)]
    pixels = torch.stack([it["pixel_values"] for it in items])
    keys = [it["cache_key"] for it in items]
    reference = VisionEncoder(config.vision, config.image)
    with torch.no_grad():
        computed = reference._frozen_output(pixels)  # [6, L, Dv]
        disk = DiskFeatureCache(cache, reference.fingerprint())
        for row, key in enumerate(keys):
            assert torch.equal(disk.get(key), computed[row].half())
        cached_config = _frozen_config(backbone_dirs[0], f"vision.feature_cache={cache}")
        encoder = VisionEncoder(cached_config.vision, cached_config.image)
        encoder.post_norm.load_state_dict(reference.post_norm.state_dict())
        hit = encoder(pixels, cache_keys=keys)
        assert encoder.feature_cache.hits == 6 and encoder.feature_cache.misses == 0
        expected = reference._head(computed.half().float().contiguous())
        torch.testing.assert_close(hit, expected, atol=1e-6, rtol=0)  # (LayerNorm may round by memory layout)
        # a miss (an image the cache does not hold) computes and rounds the same way: no hit/miss difference
        miss = encoder(pixels[:2], cache_keys=["unknown|0", "unknown|1"])
        assert encoder.feature_cache.misses == 2
        torch.testing.assert_close(miss, expected[:2], atol=1e-6, rtol=0)


def test_cache_from_other_weights_or_preprocessing_is_refused(synth: Path, backbone_dirs, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_feature_cache(_frozen_config(backbone_dirs[0]), synth, cache, progress=False)
    dataset = ManifestDataset(synth, image_size=32, channels=1, hash_images=True)
    item = dataset[0]
    for other in (_frozen_config(backbone_dirs[1], f"vision.feature_cache={cache}"),
                  _frozen_config(backbone_dirs[0], f"vision.feature_cache={cache}", "image.mean=0.4")):
        encoder = VisionEncoder(other.vision, other.image)
        with pytest.raises(FeatureCacheMismatch, match="rebuild it"):
            encoder(item["pixel_values"][None], cache_keys=[item["cache_key"]])


def test_cache_key_follows_the_image_file(synth: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(synth.parent, root)
    dataset = ManifestDataset(root / "manifest.jsonl", image_size=32, channels=1, hash_images=True)
    before = dataset[0]["cache_key"]
    record = dataset.records[0]
    path = root / record.image
    other = root / dataset.records[1].image
    path.write_bytes(other.read_bytes())  # the image changed under the same record id
    after = dataset[0]["cache_key"]
    assert before.split("|")[0] == after.split("|")[0] == record.id and before != after


def test_feature_cache_config_rules(backbone_dirs) -> None:
    with pytest.raises(ConfigError, match="frozen"):
        _frozen_config(backbone_dirs[0], "vision.feature_cache=/x", "vision.frozen=false")
    with pytest.raises(ConfigError, match="augment"):
        _frozen_config(backbone_dirs[0], "vision.feature_cache=/x", "train.augment.enabled=true")
    with pytest.raises(ConfigError, match="choose one"):
        _frozen_config(backbone_dirs[0], "vision.feature_cache=/x", "vision.cache_features=true")
