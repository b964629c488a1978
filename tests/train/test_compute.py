"""train.gradient_checkpointing and train.compile: same losses, gradients and outputs as without."""

from __future__ import annotations

import copy

import pytest
import torch

from medunifier.config import load_config
from medunifier.model.medunifier import MedUnifier
from medunifier.train.compute import compile_model, configure_compute
from shrunk_config import SMALL_MODEL

TEXTS = ["no acute cardiopulmonary process", "small left pleural effusion", "mild cardiomegaly", "clear lungs"]


def _model(**extra) -> MedUnifier:
    # a trainable ViT tower with dropout everywhere, so that a wrong RNG replay would show
    overrides = [*SMALL_MODEL, "vision.backbone=vit", "vision.frozen=false", "vision.patch_size=8",
                 "encoder.dropout=0.1", *[f"{k}={v}" for k, v in extra.items()]]
    torch.manual_seed(0)
    return MedUnifier(load_config("tiny", overrides))


def _batch(model: MedUnifier) -> dict:
    torch.manual_seed(1)
    batch = model.tokenize(TEXTS)
    c = model.config.image
    batch["pixel_values"] = torch.randn(len(TEXTS), c.channels, c.size, c.size)
    batch["ids"] = [f"s{i}" for i in range(len(TEXTS))]
    return batch


def _loss_and_grads(model: MedUnifier, batch: dict) -> tuple[dict, dict]:
    model.train()
    torch.manual_seed(2)
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.losses.items()}, grads


def test_gradient_checkpointing_keeps_losses_and_gradients():
    plain = _model()
    checkpointed = copy.deepcopy(plain)
    applied = configure_compute(checkpointed, checkpointed.config.train.model_copy(
        update={"gradient_checkpointing": True}))
    assert applied == ["gradient checkpointing: vision", "gradient checkpointing: encoder"]
    assert checkpointed.vision.backbone.is_gradient_checkpointing and checkpointed.encoder.gradient_checkpointing
    # the layers are really recomputed: count encoder layer forward calls (a pre-hook: the recomputation stops
    # early, once it has what the backward pass needs, before any forward hook)
    calls = []
    hook = checkpointed.encoder.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    batch = _batch(plain)
    losses, grads = _loss_and_grads(plain, batch)
    losses_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    hook.remove()
    forwards_per_pass = len(calls)
    assert forwards_per_pass > 0
    for name in losses:
        assert torch.allclose(losses[name], losses_ckpt[name], atol=1e-5), name
    assert grads.keys() == grads_ckpt.keys() and any(n.startswith("vision.backbone") for n in grads)
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-5), name
    # and it is recomputation: the same step without checkpointing runs each layer fewer times
    calls.clear()
    hook = plain.encoder.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    _loss_and_grads(plain, batch)
    hook.remove()
    assert len(calls) < forwards_per_pass


def _compile_works() -> str | None:
    """None when torch.compile runs here, else the reason it does not."""
    try:
        f = torch.compile(lambda x: torch.sin(x) * 2)
        f(torch.randn(4))
    except Exception as err:  # no C++ compiler, unsupported platform, ...
        return f"torch.compile does not run here: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return None


def test_compile_gives_the_same_outputs():
    reason = _compile_works()
    if reason:
        pytest.skip(reason)
    plain = _model()
    compiled = copy.deepcopy(plain)
    compile_model(compiled)
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # checkpoints keep their names
    batch = _batch(plain)
    plain.eval(), compiled.eval()
    with torch.no_grad():  # the same seed for both: ITM draws its hard negatives
        torch.manual_seed(3)
        a = plain(batch)
        torch.manual_seed(3)
        b = compiled(batch)
    for name in a.losses:
        assert torch.allclose(a.losses[name], b.losses[name], atol=1e-5), name
    feats = plain.vision(batch["pixel_values"])
    assert torch.allclose(feats, compiled.vision(batch["pixel_values"]), atol=1e-5)
