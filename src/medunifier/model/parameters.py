"""Parameter counts of a MedUnifier by module, and what task experts cost (`MedUnifier.parameter_report`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

__all__ = ["parameter_counts", "parameter_report"]


def parameter_counts(model: MedUnifier) -> dict[str, dict[str, int]]:
    """{module: {"total", "trainable"}} for vision, encoder, generator, the optional i2i head and the heads."""
    counts = {}
    for name in ("vision", "encoder", "generator", "i2i"):
        module = getattr(model, name, None)  # the image-to-image head is optional
        if module is None:
            continue
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        counts[name] = {"total": total, "trainable": trainable}
    heads = [model.image_proj, model.text_proj, model.itm_head]
    counts["heads"] = {
        "total": sum(p.numel() for m in heads for p in m.parameters()) + 1,
        "trainable": sum(p.numel() for m in heads for p in m.parameters() if p.requires_grad) + 1,
    }
    return counts


def parameter_report(model: MedUnifier) -> dict[str, int]:
    """Parameter counts (each tensor once, tied weights included once) by module, and the expert cost.

    Keys: vision, encoder, generator, heads, total, trainable; encoder.understand_experts (the modules
    a task-expert model duplicates: query/text feed-forwards, plus self-attention with
    expert_attention), encoder.generate_experts (their copies; 0 with shared experts) and
    encoder.modality_embeddings (0 when off).
    """

    def count(params) -> int:
        return sum(p.numel() for p in {id(p): p for p in params}.values())

    enc = model.encoder
    report = {name: count(getattr(model, name).parameters()) for name in ("vision", "encoder", "generator")}
    report["heads"] = count(
        [*model.image_proj.parameters(), *model.text_proj.parameters(), *model.itm_head.parameters()]
    ) + model.temperature.numel()
    attention_too = model.config.encoder.expert_attention
    duplicated = [
        m
        for layer in enc.layers
        for m in (layer.query_ffn, layer.text_ffn, *([layer.self_attention] if attention_too else []))
    ]
    report["encoder.understand_experts"] = count(p for m in duplicated for p in m.parameters())
    report["encoder.generate_experts"] = count(
        p for gen, _ in enc.expert_pairs() for p in enc.get_submodule(gen).parameters()
    )
    report["encoder.modality_embeddings"] = (
        0 if enc.modality_embeddings is None else enc.modality_embeddings.weight.numel()
    )
    report["total"] = count(model.parameters())
    report["trainable"] = count(p for p in model.parameters() if p.requires_grad)
    return report
