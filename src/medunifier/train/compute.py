"""Compute options of a training run: gradient checkpointing and torch.compile.

`train.gradient_checkpointing` recomputes activations in the backward pass instead of keeping them: every
layer of the image-text encoder, and every layer of a trainable transformer vision tower (transformers'
own checkpointing). A frozen tower keeps no activations for the backward pass anyway, and a ResNet tower is
left as it is (recomputing its BatchNorm layers would update their running statistics twice).
`torch.utils.checkpoint` replays the RNG state, so dropout masks, losses and gradients are the same.

`train.compile` compiles the vision tower's and the encoder's forward in place (`nn.Module.compile`), which
leaves parameter names, and so checkpoints, unchanged; the loss code around them stays eager.
"""

from __future__ import annotations

from torch import nn


def enable_gradient_checkpointing(model: nn.Module) -> list[str]:
    """Turn on activation recomputation in `model` (a MedUnifier); returns the modules it applies to."""
    applied = []
    vision = model.vision
    backbone = vision.backbone
    if not vision.frozen and getattr(backbone, "supports_gradient_checkpointing", False):
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        applied.append("vision")
    model.encoder.gradient_checkpointing = True
    applied.append("encoder")
    return applied


def compile_model(model: nn.Module) -> None:
    """torch.compile the vision tower and the encoder of `model` in place."""
    model.vision.compile(dynamic=True)
    model.encoder.compile(dynamic=True)


def configure_compute(model: nn.Module, train: object) -> list[str]:
    """Apply `train.gradient_checkpointing` and `train.compile` (a `TrainConfig`); returns what was turned on."""
    applied = []
    if train.gradient_checkpointing:
        applied += [f"gradient checkpointing: {m}" for m in enable_gradient_checkpointing(model)]
    if train.compile:
        compile_model(model)
        applied.append("torch.compile: vision, encoder")
    return applied
