"""Text-grounded image generator (TIG): shapes, gradient flow, codebook behaviour (EMA, k-means init, dead-code
expiry), encode/decode consistency and a small overfit run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medunifier.config import GeneratorConfig, ImageConfig, load_config
from medunifier.model.generator import (
    GeneratorOutput,
    TextGroundedGenerator,
    sinusoidal_position_encoding_2d,
)

QUERY_WIDTH, NUM_QUERIES, VISION_WIDTH, TEXT_WIDTH = 32, 8, 48, 24


def small_generator(
    image_size: int = 32,
    channels: int = 1,
    num_patches: int = 16,
    **overrides,
) -> TextGroundedGenerator:
    settings = dict(
        top_size=4,
        bottom_size=8,
        codebook_size=64,
        codebook_dim=16,
        adapter_hidden=32,
        adapter_blocks=1,
        decoder_channels=32,
    )
    settings.update(overrides)
    return TextGroundedGenerator(
        GeneratorConfig(**settings),
        ImageConfig(size=image_size, channels=channels),
        query_width=QUERY_WIDTH,
        num_queries=NUM_QUERIES,
        vision_width=VISION_WIDTH,
        num_patches=num_patches,
        text_width=TEXT_WIDTH,
    )


def random_inputs(
    batch: int, num_patches: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, NUM_QUERIES, QUERY_WIDTH, generator=g),
        torch.randn(batch, num_patches, VISION_WIDTH, generator=g),
        torch.randn(batch, TEXT_WIDTH, generator=g),
    )


def smooth_images(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, 5, 5, generator=g)
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def codebook(quantizer) -> torch.Tensor:
    return quantizer.codebook.detach().clone()  # [K, D]


def record_latents(quantizer) -> list[torch.Tensor]:
    """Latent vectors [N, D] the quantiser receives, one entry per call."""
    seen: list[torch.Tensor] = []

    def hook(module, args, output) -> None:
        seen.append(args[0].detach().permute(0, 2, 3, 1).flatten(0, 2))  # [B, D, h, w] -> [B*h*w, D]

    quantizer.register_forward_hook(hook)
    return seen


def nearest_distance(codes: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """[K] distance from each code to its nearest latent (exact differences, not the matmul form of cdist)."""
    return (codes[:, None, :] - latents[None, :, :]).norm(dim=-1).min(dim=1).values


def test_tiny_preset_shapes_losses_and_code_range():
    torch.manual_seed(0)
    cfg = load_config("tiny")
    gen = TextGroundedGenerator(
        cfg.generator,
        cfg.image,
        query_width=cfg.encoder.hidden_size,
        num_queries=cfg.encoder.num_queries,
        vision_width=cfg.vision.hidden_size,
        num_patches=cfg.num_patches,  # 8x8 patches, resized to the 16x16 bottom map
        text_width=cfg.encoder.hidden_size,
    )
    batch, size, channels = 8, cfg.image.size, cfg.image.channels  # 8 * 8 * 8 = 512 top latents > 256 codes
    query = torch.randn(batch, cfg.encoder.num_queries, cfg.encoder.hidden_size)
    local = torch.randn(batch, cfg.num_patches, cfg.vision.hidden_size)
    text = torch.randn(batch, cfg.encoder.hidden_size)
    target = torch.rand(batch, channels, size, size) * 2 - 1
    out = gen(query, local, text, target)
    assert isinstance(out, GeneratorOutput)
    t, b, k = cfg.generator.top_size, cfg.generator.bottom_size, cfg.generator.codebook_size
    assert out.images.shape == (batch, channels, size, size)
    assert out.codes_top.shape == (batch, t, t) and out.codes_top.dtype == torch.long
    assert out.codes_bottom.shape == (batch, b, b) and out.codes_bottom.dtype == torch.long
    for codes in (out.codes_top, out.codes_bottom):
        assert int(codes.min()) >= 0 and int(codes.max()) < k
    assert torch.allclose(out.mse, F.mse_loss(out.images, target))
    assert torch.allclose(out.loss, out.mse + out.vq_top + out.vq_bottom)
    assert out.vq_top > 0 and out.vq_bottom > 0
    for usage, perplexity, codes in (
        (out.usage_top, out.perplexity_top, out.codes_top),
        (out.usage_bottom, out.perplexity_bottom, out.codes_bottom),
    ):
        assert usage == pytest.approx(codes.unique().numel() / k)
        assert 1.0 <= float(perplexity) <= codes.unique().numel() + 1e-4

    no_target = gen(query, local, text)
    assert float(no_target.loss) == 0.0 and float(no_target.mse) == 0.0
    with pytest.raises(ValueError, match="target_images"):
        gen(query, local, text, target[:, :, :-1])


@pytest.mark.parametrize("grid", [16, 32, 8])  # equal to, larger than and smaller than the 16x16 bottom map
def test_224_shapes_with_16x16_bottom(grid: int):
    torch.manual_seed(0)
    num_patches = grid * grid
    gen = small_generator(
        image_size=224, channels=3, num_patches=num_patches, top_size=8, bottom_size=16
    ).eval()
    query, local, text = random_inputs(2, num_patches)
    out = gen(query, local, text, torch.zeros(2, 3, 224, 224))
    assert out.images.shape == (2, 3, 224, 224)
    assert out.codes_top.shape == (2, 8, 8) and out.codes_bottom.shape == (2, 16, 16)
    assert out.vq_top > 0  # eval mode still reports the commitment term


def test_non_square_patch_grid_is_rejected():
    with pytest.raises(ValueError, match="square patch grid"):
        small_generator(num_patches=15)


def test_position_encoding_distinguishes_every_position():
    pe = sinusoidal_position_encoding_2d(32, 8, 8).flatten(1).T  # [64, 32]
    distances = torch.cdist(pe, pe) + torch.eye(64) * 1e3
    assert float(distances.min()) > 1e-2
    assert pe.abs().max() <= 1.0


@pytest.mark.parametrize("rotation_trick", [True, False])
def test_reconstruction_gradient_reaches_both_adapters_and_decoder(rotation_trick: bool):
    torch.manual_seed(0)
    gen = small_generator(rotation_trick=rotation_trick).train()
    query, local, text = random_inputs(4)
    query.requires_grad_(True)
    local.requires_grad_(True)
    text.requires_grad_(True)
    out = gen(query, local, text, smooth_images(4, 1, 32))
    out.mse.backward()  # the pixel loss alone must cross both quantisers
    modules = {
        "top_adapter": gen.top_adapter.mlp[1].weight,
        "top_mix": gen.top_adapter.mix.weight,
        "bottom_adapter": gen.bottom_adapter.mlp[1].weight,
        "bottom_top_decoder": gen.bottom_adapter.top_decoder[-1].weight,
        "decoder": gen.decoder.fuse.weight,
        "decoder_out": gen.decoder.out.weight,
    }
    for name, weight in modules.items():
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name
    for name, tensor in (("query", query), ("local", local), ("text", text)):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name


def test_kmeans_init_happens_on_first_batch():
    torch.manual_seed(0)
    gen = small_generator(kmeans_iters=10).train()
    quantizer = gen.quantizer_top
    assert not bool(quantizer._codebook.initted)
    assert codebook(quantizer).abs().sum() == 0  # k-means init starts from an all-zero codebook
    latents = record_latents(quantizer)
    out = gen(*random_inputs(8))
    assert bool(quantizer._codebook.initted) and bool(gen.quantizer_bottom._codebook.initted)
    z = latents[0]  # [N, D]
    # with the zero codebook every latent would map to one code with error ||z||^2
    assert out.codes_top.unique().numel() > 16
    codes = codebook(quantizer)
    error = nearest_distance(z, codes).pow(2).mean()
    assert float(error) < 0.5 * float(z.pow(2).sum(dim=1).mean())


def test_ema_updates_codebook_in_train_mode_only():
    torch.manual_seed(0)
    gen = small_generator(threshold_ema_dead_code=0).train()
    gen(*random_inputs(8, seed=0))  # k-means init + first EMA step
    before = codebook(gen.quantizer_bottom)
    gen(*random_inputs(8, seed=1))
    after_train = codebook(gen.quantizer_bottom)
    assert not torch.allclose(before, after_train)

    with torch.no_grad():  # train mode but inference: no update
        gen(*random_inputs(8, seed=2))
    assert torch.equal(codebook(gen.quantizer_bottom), after_train)

    gen.eval()
    sizes = gen.quantizer_top._codebook.cluster_size.clone()
    gen(*random_inputs(8, seed=3))
    assert torch.equal(codebook(gen.quantizer_bottom), after_train)
    assert torch.equal(gen.quantizer_top._codebook.cluster_size, sizes)


@pytest.mark.parametrize("threshold", [0.0, 1e9])
def test_dead_code_expiry_replaces_codes_with_batch_latents(threshold: float):
    torch.manual_seed(0)
    gen = small_generator(threshold_ema_dead_code=threshold).train()
    latents = record_latents(gen.quantizer_top)
    gen(*random_inputs(8, seed=0))  # 8 * 4 * 4 = 128 latents >= 64 codes
    nearest = nearest_distance(codebook(gen.quantizer_top), latents[0])  # [K]
    if threshold > 0:  # every code is below the threshold, so each one is re-drawn from this batch's latents
        assert float(nearest.max()) < 1e-5
    else:  # k-means + EMA means: averages of several latents, not copies of one
        assert float((nearest > 1e-3).float().mean()) > 0.5


def test_decode_codes_matches_forward_reconstruction():
    torch.manual_seed(0)
    gen = small_generator()
    inputs = random_inputs(4)
    gen.train()
    for seed in range(3):  # a few training-mode steps so the codebook is not just its k-means init
        gen(*random_inputs(4, seed=seed))
    gen.eval()
    with torch.no_grad():
        out = gen(*inputs)
        codes_top, codes_bottom = gen.encode_codes(*inputs)
        decoded = gen.decode_codes(codes_top, codes_bottom)
    assert torch.equal(codes_top, out.codes_top) and torch.equal(codes_bottom, out.codes_bottom)
    assert torch.allclose(decoded, out.images, atol=1e-5)
    # changing the codes changes the image (decode really reads them)
    other = gen.decode_codes(codes_top, (codes_bottom + 1) % gen.codebook_size_bottom)
    assert not torch.allclose(other, decoded, atol=1e-3)


def test_overfits_a_few_smooth_images():
    torch.manual_seed(0)
    gen = small_generator(
        codebook_size=128, codebook_dim=32, adapter_hidden=64, decoder_channels=32, threshold_ema_dead_code=2
    ).train()
    batch = 16
    inputs = random_inputs(batch)
    target = smooth_images(batch, 1, 32, seed=1)
    optimizer = torch.optim.Adam(gen.parameters(), lr=2e-3)
    for _ in range(200):
        out = gen(*inputs, target)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    gen.eval()
    with torch.no_grad():
        out = gen(*inputs, target)
    psnr = 10 * math.log10(2.0**2 / float(out.mse))  # images in [-1, 1]
    baseline = 10 * math.log10(2.0**2 / float(target.var()))  # predicting the mean image
    assert psnr > 20.0, f"PSNR {psnr:.1f} dB after 200 steps (mean-image baseline {baseline:.1f} dB)"
    assert float(out.usage_bottom) > 0.25  # no codebook collapse


def test_paper_preset_builds_and_runs():
    cfg = load_config("paper")
    gen = TextGroundedGenerator(
        cfg.generator,
        cfg.image,
        query_width=cfg.encoder.hidden_size,
        num_queries=cfg.encoder.num_queries,
        vision_width=cfg.vision.hidden_size,
        num_patches=cfg.num_patches,
        text_width=cfg.encoder.hidden_size,
    ).eval()
    params = sum(p.numel() for p in gen.parameters())
    assert 5_000_000 < params < 100_000_000
    assert gen.quantizer_top.codebook.shape == (512, 768)
    with torch.no_grad():
        out = gen(
            torch.randn(1, cfg.encoder.num_queries, cfg.encoder.hidden_size),
            torch.randn(1, cfg.num_patches, cfg.vision.hidden_size),
            torch.randn(1, cfg.encoder.hidden_size),
        )
    assert out.images.shape == (1, 3, 224, 224)
    assert out.codes_top.shape == (1, 8, 8) and out.codes_bottom.shape == (1, 16, 16)


def test_codebook_size_and_dim_per_level():
    """Per-level overrides shape each quantiser, adapter and the decoder; the defaults keep one shared codebook."""
    torch.manual_seed(0)
    shared = small_generator()
    assert shared.quantizer_top.codebook.shape == shared.quantizer_bottom.codebook.shape == (64, 16)
    gen = small_generator(top_codebook_size=8, top_codebook_dim=12, bottom_codebook_size=128, bottom_codebook_dim=20)
    assert gen.quantizer_top.codebook.shape == (8, 12) and gen.quantizer_bottom.codebook.shape == (128, 20)
    gen.train()
    out = gen(*random_inputs(4), target_images=smooth_images(4, 1, 32))
    assert out.images.shape == (4, 1, 32, 32) and torch.isfinite(out.loss)
    assert int(out.codes_top.max()) < 8 and out.codes_bottom.shape == (4, 8, 8)
    assert out.usage_top * 8 == len(out.codes_top.unique())  # usage counts against the level's own size
    out.loss.backward()
    assert gen.top_adapter.out.weight.grad.abs().sum() > 0
    gen.eval()
    with torch.no_grad():
        top, bottom = gen.encode_codes(*random_inputs(2))
        assert gen.decode_codes(top, bottom).shape == (2, 1, 32, 32)


def test_code_priors_need_one_codebook_size():
    from medunifier.generate.train_prior import prior_config

    config = load_config("tiny", ["generator.top_codebook_size=64", "generator.bottom_codebook_size=128"])
    with pytest.raises(ValueError, match="one vocabulary"):
        prior_config(config)
    same = load_config("tiny", ["generator.top_codebook_size=64", "generator.bottom_codebook_size=64"])
    assert prior_config(same).codebook_size == 64


@pytest.mark.parametrize(("image_size", "bottom_size", "pixel_size"), [(32, 8, None), (24, 8, None), (16, 16, None),
                                                                     (32, 8, 4), (24, 8, 4)])
def test_pixel_encoder_map_has_the_bottom_side(image_size: int, bottom_size: int, pixel_size: int | None):
    gen = small_generator(image_size=image_size, bottom_size=bottom_size, pixel_channels=12, pixel_size=pixel_size)
    pixel_map = gen.pixel_encoder(torch.randn(2, 1, image_size, image_size))
    assert pixel_map.shape == (2, 12, bottom_size, bottom_size)


def test_pixel_path_makes_the_bottom_codes_read_the_image():
    """With pixel_channels the same adapter inputs give different bottom codes for different images, the top
    codes (from the queries alone) stay the same, and the pixel loss trains the pixel encoder."""
    torch.manual_seed(0)
    gen = small_generator(pixel_channels=16).train()
    inputs = random_inputs(4)
    images = smooth_images(4, 1, 32, seed=1)
    out = gen(*inputs, images, pixel_values=images)
    out.mse.backward()
    for name, p in gen.pixel_encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    gen.eval()
    with torch.no_grad():
        top_a, bottom_a = gen.encode_codes(*inputs, images)
        top_b, bottom_b = gen.encode_codes(*inputs, smooth_images(4, 1, 32, seed=2))
    assert torch.equal(top_a, top_b)
    assert not torch.equal(bottom_a, bottom_b)


def test_pixel_path_on_the_top_level_makes_the_top_codes_read_the_image():
    torch.manual_seed(0)
    gen = small_generator(pixel_channels=16, pixel_level="top").eval()
    assert gen.bottom_adapter.pixel_channels == 0 and gen.top_adapter.pixel_channels == 16
    inputs = random_inputs(4)
    top_latents, bottom_latents = record_latents(gen.quantizer_top), record_latents(gen.quantizer_bottom)
    with torch.no_grad():
        assert gen.pixel_encoder(smooth_images(4, 1, 32)).shape == (4, 16, 4, 4)  # top_size 4
        gen.encode_codes(*inputs, smooth_images(4, 1, 32, seed=1))
        gen.encode_codes(*inputs, smooth_images(4, 1, 32, seed=2))
    assert not torch.allclose(top_latents[0], top_latents[1])  # the top latents read the pixels
    assert bottom_latents[0].shape[0] == 4 * 8 * 8  # the bottom adapter runs as before, at b x b


def test_pixel_path_needs_the_pixels():
    gen = small_generator(pixel_channels=8)
    with pytest.raises(ValueError, match="pass pixel_values"):
        gen(*random_inputs(2))


def test_pixel_path_overfits_better_than_adapter_inputs_that_ignore_the_image():
    """Adapter inputs that carry nothing about the images (random, as a semantic frozen tower's features carry
    little pixel detail): only the pixel path can reconstruct them."""
    def fit(pixel_channels: int) -> float:
        torch.manual_seed(0)
        gen = small_generator(codebook_size=128, codebook_dim=32, adapter_hidden=64, pixel_channels=pixel_channels)
        gen.train()
        inputs = random_inputs(16)
        target = smooth_images(16, 1, 32, seed=1)
        extra = {"pixel_values": target} if pixel_channels else {}
        optimizer = torch.optim.Adam(gen.parameters(), lr=2e-3)
        for _ in range(60):
            out = gen(*inputs, target, **extra)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        gen.eval()
        # held-out: the same adapter inputs with new images
        fresh = smooth_images(16, 1, 32, seed=3)
        with torch.no_grad():
            extra = {"pixel_values": fresh} if pixel_channels else {}
            return float(gen(*inputs, fresh, **extra).mse)

    assert fit(16) < 0.5 * fit(0)
