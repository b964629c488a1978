"""Text-grounded image generator (TIG) of MedUnifier: a two-level VQ-VAE whose encoders are latent adapters.

    z_top = f_q [B, Q, H]                 --top adapter-->    [B, D, t, t] --quantizer_top-->    codes_top [B, t, t]
    z_bot = [f_local ‖ f_t_cls] [B, L, .] --bottom adapter--> [B, D, b, b] --quantizer_bottom--> codes_bottom [B, b, b]
            (conditioned on the quantised top, as in VQ-VAE-2; with `generator.pixel_channels` > 0 it also reads
            a small trainable convolutional encoder of the pixels, VQ-VAE-2's bottom encoder; with
            `generator.pixel_level: top` the top adapter reads that map instead, at t x t)
    decoder D(z_q_top, z_q_bottom) -> image [B, C, S, S];   loss = MSE(image, target) + vq_top + vq_bottom

D = `codebook_dim`, t = `top_size`, b = `bottom_size`, S = `image.size`, C = `image.channels`. Each level may
have its own codebook size and code dim (`generator.{top,bottom}_codebook_{size,dim}`), D_top and D_bottom.

Quantisers are `vector_quantize_pytorch.VectorQuantize` with an EMA codebook (so the codebook term of the VQ-VAE
loss is replaced by the EMA update and the returned VQ loss is beta * ||z - sg[q]||^2, beta = `commitment_weight`),
k-means initialisation on the first batch, dead-code expiry (codes whose EMA cluster size falls below
`threshold_ema_dead_code` are replaced by random latents of the current batch) and the rotation trick for the
gradient through the quantiser. Under DDP (torch.distributed initialised with world size > 1 *before* the module is
built) the codebook statistics, k-means samples and replacements are all-reduced so every rank keeps the same codebook.

Codebook state (EMA statistics, dead-code expiry) changes only in train mode *with gradients enabled*: a forward
under `torch.no_grad()` or in eval mode never touches it. The one exception is the k-means initialisation, which
happens on the very first forward whatever the mode (an uninitialised codebook is all zeros).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import VectorQuantize

from medunifier.config import GeneratorConfig, ImageConfig
from medunifier.model.losses import tig_loss
from medunifier.utils import process_group_rank_world

DECODER_RES_BLOCKS = 2  # residual blocks at the bottom resolution in the decoder (VQ-VAE-2 uses 2)
MIN_DECODER_CHANNELS = 32  # channel floor when the decoder halves its width at each x2 upsampling stage


@dataclass
class GeneratorOutput:
    images: Tensor  # [B, C, S, S] reconstruction, normalised like the inputs
    loss: Tensor  # mse + vq_top + vq_bottom (scalar); 0 when no target is given
    mse: Tensor  # 0 when no target is given
    vq_top: Tensor  # beta * commitment of the top latents (scalar)
    vq_bottom: Tensor
    codes_top: Tensor  # [B, t, t] long
    codes_bottom: Tensor  # [B, b, b] long
    usage_top: Tensor  # fraction of codebook entries used in this batch
    usage_bottom: Tensor
    perplexity_top: Tensor  # exp(entropy) of the batch code histogram
    perplexity_bottom: Tensor


def sinusoidal_position_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """Fixed 2D sine/cosine encoding [channels, height, width]: a quarter of the channels each for sin(y), cos(y),
    sin(x), cos(x) at geometric frequencies (as in the transformer's 1D encoding); leftover channels are zero."""
    quarter = channels // 4
    pe = torch.zeros(channels, height, width)
    if quarter == 0:
        return pe
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, dtype=torch.float32) / quarter)  # [c/4]
    y = torch.arange(height, dtype=torch.float32)[:, None] * freqs[None]  # [h, c/4]
    x = torch.arange(width, dtype=torch.float32)[:, None] * freqs[None]  # [w, c/4]
    pe[0 * quarter : 1 * quarter] = y.sin().T[:, :, None].expand(quarter, height, width)
    pe[1 * quarter : 2 * quarter] = y.cos().T[:, :, None].expand(quarter, height, width)
    pe[2 * quarter : 3 * quarter] = x.sin().T[:, None, :].expand(quarter, height, width)
    pe[3 * quarter : 4 * quarter] = x.cos().T[:, None, :].expand(quarter, height, width)
    return pe


class ResBlock(nn.Module):
    """VQ-VAE(-2) residual block: x + conv1x1(relu(conv3x3(relu(x)))), no normalisation."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 2, 8)
        self.conv3 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv1 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(F.relu(self.conv3(F.relu(x))))


def mlp(in_dim: int, hidden: int) -> nn.Sequential:
    """Per-token MLP: LayerNorm -> Linear -> GELU -> Linear (LayerNorm since encoder/vision scales differ)."""
    return nn.Sequential(
        nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
    )


def upsample_conv(in_channels: int, out_channels: int, factor: int) -> nn.Sequential:
    """Nearest-neighbour upsampling by an integer factor followed by a 3x3 conv (any factor, no checkerboard)."""
    layers: list[nn.Module] = [nn.Upsample(scale_factor=factor, mode="nearest")] if factor > 1 else []
    return nn.Sequential(*layers, nn.Conv2d(in_channels, out_channels, 3, padding=1))


class PixelEncoder(nn.Module):
    """Image [B, C, S, S] -> [B, channels, m, m]: a 3x3 conv to channels/2, then stride-2 4x4 convs while the side
    stays >= p (the last one to `channels`), average-pooled to p when S / p is not a power of two, one residual block,
    and a bilinear resize from p to m when they differ (p = `size`, m = `out_size`, the side of the latent map of
    the adapter that reads it).

    A frozen backbone trained for semantics (stage 0's contrastive tower) keeps little pixel detail in its
    stride-8 features; VQ-VAE-2's bottom encoder reads the pixels, and so can one latent adapter here.
    """

    def __init__(self, in_channels: int, channels: int, image_size: int, size: int, out_size: int | None = None):
        super().__init__()
        if size > image_size:
            raise ValueError(f"the pixel encoder's map side ({size}) must not exceed the image side ({image_size})")
        self.out_size = out_size or size
        half = max(channels // 2, 8)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, half, 3, padding=1)]
        halvings, side = 0, image_size
        while side // 2 >= size:
            halvings, side = halvings + 1, side // 2
        width = half
        for i in range(halvings):
            out = channels if i == halvings - 1 else half
            layers += [nn.ReLU(), nn.Conv2d(width, out, 4, stride=2, padding=1)]
            width = out
        if width != channels:  # no halving (b == S): widen at full resolution
            layers += [nn.ReLU(), nn.Conv2d(width, channels, 3, padding=1)]
        self.down = nn.Sequential(*layers)
        self.size = size
        self.block = ResBlock(channels)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.down(pixel_values)  # [B, channels, s, s], p <= s < 2p
        if x.shape[-1] != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        x = self.block(x)  # [B, channels, p, p]
        if self.out_size != self.size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return x  # [B, channels, m, m]


class TopAdapter(nn.Module):
    """f_q [B, Q, H] -> top latent map [B, D, t, t].

    A per-query MLP (H -> hidden), then a learned linear mixing over the query axis (Q -> t*t positions: each map
    position is a learned weighted sum of the queries, as the queries carry no spatial order), laid out on the
    t x t grid, plus a fixed 2D sinusoidal encoding, residual conv blocks and a 1x1 conv to D.
    """

    def __init__(self, query_width: int, num_queries: int, hidden: int, blocks: int, size: int, out_dim: int,
                 pixel_channels: int = 0):
        """pixel_channels: the width of a t x t pixel-encoder map fused in before the blocks (0 = none)."""
        super().__init__()
        self.size = size
        self.mlp = mlp(query_width, hidden)
        self.mix = nn.Linear(num_queries, size * size)
        self.register_buffer("pos", sinusoidal_position_encoding_2d(hidden, size, size), persistent=False)
        self.pixel_channels = pixel_channels
        self.fuse = nn.Conv2d(hidden + pixel_channels, hidden, 1) if pixel_channels else None
        self.blocks = nn.Sequential(*[ResBlock(hidden) for _ in range(blocks)])
        self.out = nn.Conv2d(hidden, out_dim, 1)

    def forward(self, query_states: Tensor, pixel_map: Tensor | None = None) -> Tensor:
        x = self.mlp(query_states)  # [B, Q, hidden]
        x = self.mix(x.transpose(1, 2))  # [B, hidden, t*t]
        x = x.unflatten(2, (self.size, self.size)) + self.pos  # [B, hidden, t, t]
        if (pixel_map is None) != (self.fuse is None):
            raise ValueError("the top adapter takes a pixel map exactly when it was built with pixel_channels > 0")
        if self.fuse is not None:
            x = self.fuse(torch.cat([x, pixel_map.to(x.dtype)], dim=1))  # pixel map [B, P, t, t]
        return self.out(F.relu(self.blocks(x)))  # [B, D, t, t]


class BottomAdapter(nn.Module):
    """[f_local ‖ f_t_cls] [B, L, Dv + Ht] -> bottom latent map [B, D, b, b], conditioned on the quantised top.

    A per-patch MLP over the patch feature concatenated with the text [CLS] state, laid out on the patches'
    sqrt(L) x sqrt(L) grid, resized to b x b when the grid differs (bilinear up, average-pool down), plus a fixed
    2D sinusoidal encoding. The quantised top map is "decoded" to b x b (nearest upsampling + 3x3 conv) and
    concatenated before a 1x1 fusion conv and the residual blocks (VQ-VAE-2's bottom encoder sees dec_t(q_top)).
    With `pixel_channels` > 0 the pixel encoder's b x b map is concatenated there too.
    """

    def __init__(
        self,
        vision_width: int,
        text_width: int,
        num_patches: int,
        hidden: int,
        blocks: int,
        size: int,
        top_size: int,
        code_dim: int,
        top_dim: int | None = None,
        pixel_channels: int = 0,
    ):
        """code_dim: the bottom codes' size; top_dim: the quantised top's (default code_dim); pixel_channels: the
        pixel encoder's map width (0 = no pixel path)."""
        super().__init__()
        self.grid = math.isqrt(num_patches)
        if self.grid * self.grid != num_patches:
            raise ValueError(f"the bottom adapter needs a square patch grid, got num_patches={num_patches}")
        self.size = size
        self.mlp = mlp(vision_width + text_width, hidden)
        self.register_buffer("pos", sinusoidal_position_encoding_2d(hidden, size, size), persistent=False)
        self.top_decoder = upsample_conv(top_dim or code_dim, hidden, size // top_size)
        self.pixel_channels = pixel_channels
        self.fuse = nn.Conv2d(2 * hidden + pixel_channels, hidden, 1)
        self.blocks = nn.Sequential(*[ResBlock(hidden) for _ in range(blocks)])
        self.out = nn.Conv2d(hidden, code_dim, 1)

    def forward(
        self, local_features: Tensor, text_cls: Tensor, quantized_top: Tensor, pixel_map: Tensor | None = None
    ) -> Tensor:
        batch, num_patches, _ = local_features.shape
        text = text_cls[:, None, :].expand(batch, num_patches, text_cls.shape[-1])  # [B, L, Ht]
        x = self.mlp(torch.cat([local_features, text], dim=-1))  # [B, L, hidden]
        x = x.transpose(1, 2).unflatten(2, (self.grid, self.grid))  # [B, hidden, g, g]
        if self.grid < self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        elif self.grid > self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        x = x + self.pos  # [B, hidden, b, b]
        top = self.top_decoder(quantized_top)  # [B, hidden, b, b]
        if (pixel_map is None) != (self.pixel_channels == 0):
            raise ValueError("the bottom adapter takes a pixel map exactly when it was built with pixel_channels > 0")
        maps = [x, top] if pixel_map is None else [x, top, pixel_map.to(x.dtype)]  # pixel map [B, P, b, b]
        x = self.fuse(torch.cat(maps, dim=1))
        return self.out(F.relu(self.blocks(x)))  # [B, D, b, b]


class Decoder(nn.Module):
    """D(z_q_top, z_q_bottom) -> image [B, C, S, S].

    The quantised top is upsampled to b x b (nearest + 3x3 conv) and concatenated with the quantised bottom, fused by
    a 3x3 conv to `channels`, then DECODER_RES_BLOCKS residual blocks and floor(log2(S / b)) stride-2 transposed
    convolutions (width halving each stage, floored at MIN_DECODER_CHANNELS). When S is not b times a power of two
    (paper: 224 from 16 -> 16, 32, 64, 128) the map is resized bilinearly to S and refined by one 3x3 conv at full
    resolution, instead of overshooting to 256 and shrinking; a final 3x3 conv gives C channels (no output squashing:
    targets are normalised images, not [0, 1]).
    """

    def __init__(
        self,
        code_dim: int,
        channels: int,
        top_size: int,
        bottom_size: int,
        image_size: int,
        out_channels: int,
        bottom_dim: int | None = None,
    ):
        """code_dim: the top codes' size; bottom_dim: the bottom codes' (default code_dim)."""
        super().__init__()
        self.image_size = image_size
        self.top_up = upsample_conv(code_dim, code_dim, bottom_size // top_size)
        self.fuse = nn.Conv2d(code_dim + (bottom_dim or code_dim), channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(channels) for _ in range(DECODER_RES_BLOCKS)])
        stages: list[nn.Module] = []
        width, side = channels, bottom_size
        while side * 2 <= image_size:
            next_width = max(width // 2, min(MIN_DECODER_CHANNELS, width))
            stages += [nn.ReLU(), nn.ConvTranspose2d(width, next_width, 4, stride=2, padding=1)]
            width, side = next_width, side * 2
        self.upsample = nn.Sequential(*stages)
        self.needs_resize = side != image_size
        self.refine = nn.Conv2d(width, width, 3, padding=1) if self.needs_resize else nn.Identity()
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, quantized_top: Tensor, quantized_bottom: Tensor) -> Tensor:
        x = torch.cat([self.top_up(quantized_top), quantized_bottom], dim=1)  # [B, D_top + D_bottom, b, b]
        x = self.upsample(self.blocks(self.fuse(x)))  # [B, w, b * 2^k, b * 2^k]
        if self.needs_resize:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
            x = self.refine(F.relu(x))
        return self.out(F.relu(x))  # [B, C, S, S]



def make_quantizer(gen: GeneratorConfig, level: str = "top") -> VectorQuantize:
    """EMA VQ codebook of one level's codebook size x code dim on channel-first maps (no projection in or out)."""
    size, dim = gen.level_codebook(level)
    return VectorQuantize(
        dim=dim,
        codebook_size=size,
        codebook_dim=dim,
        decay=gen.ema_decay,
        kmeans_init=gen.kmeans_init,
        kmeans_iters=gen.kmeans_iters,
        threshold_ema_dead_code=gen.threshold_ema_dead_code,
        rotation_trick=gen.rotation_trick,
        commitment_weight=gen.commitment_weight,
        accept_image_fmap=True,
        sync_codebook=process_group_rank_world()[1] > 1,
    )


def code_statistics(codes: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """(fraction of entries used, perplexity = exp(entropy of the code histogram)) for one batch of codes."""
    counts = torch.bincount(codes.flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return (counts > 0).float().mean(), entropy.exp()


class TextGroundedGenerator(nn.Module):
    """MedUnifier's TIG head: query outputs + patch features + text [CLS] -> (top, bottom) VQ codes -> image."""

    def __init__(
        self,
        gen: GeneratorConfig,
        image: ImageConfig,
        query_width: int,
        num_queries: int,
        vision_width: int,
        num_patches: int,
        text_width: int,
    ):
        super().__init__()
        if gen.bottom_size % gen.top_size:
            raise ValueError(
                f"generator.bottom_size ({gen.bottom_size}) must be a multiple of top_size ({gen.top_size})"
            )
        if gen.bottom_size > image.size:
            raise ValueError(
                f"generator.bottom_size ({gen.bottom_size}) must not exceed image.size ({image.size})"
            )
        self.config = gen
        self.image_size, self.channels = image.size, image.channels
        self.top_size, self.bottom_size = gen.top_size, gen.bottom_size
        (self.codebook_size_top, top_dim), (self.codebook_size_bottom, bottom_dim) = (
            gen.level_codebook("top"), gen.level_codebook("bottom"))
        self.commitment_weight = gen.commitment_weight
        top_pixels = gen.pixel_channels if gen.pixel_level == "top" else 0
        self.top_adapter = TopAdapter(
            query_width, num_queries, gen.adapter_hidden, gen.adapter_blocks, gen.top_size, top_dim, top_pixels
        )
        self.bottom_adapter = BottomAdapter(
            vision_width,
            text_width,
            num_patches,
            gen.adapter_hidden,
            gen.adapter_blocks,
            gen.bottom_size,
            gen.top_size,
            bottom_dim,
            top_dim=top_dim,
            pixel_channels=gen.pixel_channels - top_pixels,
        )
        pixel_side = gen.level_size(gen.pixel_level)
        self.pixel_encoder = (
            PixelEncoder(image.channels, gen.pixel_channels, image.size, gen.pixel_size or pixel_side, pixel_side)
            if gen.pixel_channels else None)
        self.quantizer_top = make_quantizer(gen, "top")
        self.quantizer_bottom = make_quantizer(gen, "bottom")
        self.decoder = Decoder(
            top_dim, gen.decoder_channels, gen.top_size, gen.bottom_size, image.size, image.channels,
            bottom_dim=bottom_dim,
        )

    def _quantize(self, quantizer: VectorQuantize, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """latents [B, D, h, w] -> (quantised [B, D, h, w], codes [B, h, w], beta * commitment)."""
        update_codebook = self.training and torch.is_grad_enabled()
        # the quantiser (code search, EMA update, VQ losses) runs in float32 under any autocast: the library
        # turns off CUDA autocast only, and CPU bf16 autocast would otherwise reach its matrix products
        with torch.autocast(device_type=latents.device.type, enabled=False):
            quantized, codes, loss = quantizer(latents.float(), freeze_codebook=not update_codebook)
        if not self.training:  # the library only reports the commitment loss in train mode
            loss = self.commitment_weight * F.mse_loss(latents, quantized.detach())
        return quantized, codes, loss

    def _pixel_map(self, pixel_values: Tensor | None) -> Tensor | None:
        """The pixel encoder's [B, P, m, m] map (m: the side of the level that reads it), or None without a pixel
        path."""
        if self.pixel_encoder is None:
            return None
        if pixel_values is None:
            raise ValueError(
                "this generator reads the pixels (generator.pixel_channels > 0): pass pixel_values, the input images "
                "[B, C, S, S] normalised like the model's inputs"
            )
        return self.pixel_encoder(pixel_values)

    def _encode(
        self, query_states: Tensor, local_features: Tensor, text_cls: Tensor, pixel_values: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        pixel_map = self._pixel_map(pixel_values)  # [B, P, m, m] or None
        on_top = self.config.pixel_level == "top"
        z_top = self.top_adapter(query_states, pixel_map if on_top else None)  # [B, D, t, t]
        q_top, codes_top, vq_top = self._quantize(self.quantizer_top, z_top)
        z_bottom = self.bottom_adapter(local_features, text_cls, q_top, None if on_top else pixel_map)  # [B, D, b, b]
        q_bottom, codes_bottom, vq_bottom = self._quantize(self.quantizer_bottom, z_bottom)
        return q_top, q_bottom, codes_top, codes_bottom, vq_top, vq_bottom

    def forward(
        self,
        query_states: Tensor,  # [B, Q, H] f_q
        local_features: Tensor,  # [B, L, Dv] f_local (patch tokens, no [CLS])
        text_cls: Tensor,  # [B, Ht] f_t_cls
        target_images: Tensor | None = None,  # [B, C, S, S]
        pixel_values: Tensor | None = None,  # [B, C, S, S] input images: needed with generator.pixel_channels > 0
    ) -> GeneratorOutput:
        q_top, q_bottom, codes_top, codes_bottom, vq_top, vq_bottom = self._encode(
            query_states, local_features, text_cls, pixel_values
        )
        images = self.decoder(q_top, q_bottom)  # [B, C, S, S]
        if target_images is not None:
            if target_images.shape != images.shape:
                raise ValueError(
                    f"target_images {tuple(target_images.shape)} != reconstruction {tuple(images.shape)}"
                )
            loss, mse = tig_loss(images, target_images, vq_top, vq_bottom)
        else:
            mse = loss = images.new_zeros((), dtype=torch.float32)
        usage_top, perplexity_top = code_statistics(codes_top, self.codebook_size_top)
        usage_bottom, perplexity_bottom = code_statistics(codes_bottom, self.codebook_size_bottom)
        return GeneratorOutput(
            images=images,
            loss=loss,
            mse=mse,
            vq_top=vq_top,
            vq_bottom=vq_bottom,
            codes_top=codes_top,
            codes_bottom=codes_bottom,
            usage_top=usage_top,
            usage_bottom=usage_bottom,
            perplexity_top=perplexity_top,
            perplexity_bottom=perplexity_bottom,
        )

    def encode_codes(
        self, query_states: Tensor, local_features: Tensor, text_cls: Tensor, pixel_values: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(codes_top [B, t, t], codes_bottom [B, b, b]); in train mode with grad enabled this updates the codebook."""
        _, _, codes_top, codes_bottom, _, _ = self._encode(query_states, local_features, text_cls, pixel_values)
        return codes_top, codes_bottom

    def decode_codes(self, codes_top: Tensor, codes_bottom: Tensor) -> Tensor:
        """Code maps -> image [B, C, S, S]; equals the forward's reconstruction for the same codes (eval mode)."""
        q_top = self.quantizer_top.get_codes_from_indices(codes_top)  # [B, D, t, t]
        q_bottom = self.quantizer_bottom.get_codes_from_indices(codes_bottom)  # [B, D, b, b]
        dtype = next(self.decoder.parameters()).dtype
        return self.decoder(q_top.to(dtype), q_bottom.to(dtype))

    @torch.no_grad()
    def codebook_stats(self) -> dict[str, float]:
        """Long-run codebook health from the EMA cluster sizes: fraction of live entries (EMA count >= 1) and the
        perplexity of the EMA assignment distribution, per level."""
        stats: dict[str, float] = {}
        for name, quantizer in (("top", self.quantizer_top), ("bottom", self.quantizer_bottom)):
            sizes = quantizer._codebook.cluster_size.flatten().float()
            probs = sizes / sizes.sum().clamp_min(1e-12)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
            stats[f"live_{name}"] = float((sizes >= 1).float().mean())
            stats[f"ema_perplexity_{name}"] = float(entropy.exp())
        return stats
