"""The top-level model: objectives, gradient routing, ITC reference, hard negatives, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import medunifier.model.losses as losses_module
from medunifier.config import LossWeights, load_config
from medunifier.model.losses import itc_similarity, sample_hard_negatives
from medunifier.model.medunifier import MedUnifier
from shrunk_config import SMALL_MODEL

SMALL = [*SMALL_MODEL, "encoder.dropout=0.0"]

TEXTS = [
    "FINDINGS: Mild cardiomegaly. No pleural effusion. IMPRESSION: Enlarged heart.",
    "FINDINGS: Small left pleural effusion. IMPRESSION: Left effusion.",
    "FINDINGS: The lungs are clear. IMPRESSION: No acute cardiopulmonary process.",
    "FINDINGS: Right upper lobe consolidation. IMPRESSION: Pneumonia.",
]


def small_model(*extra: str) -> MedUnifier:
    torch.manual_seed(0)
    return MedUnifier(load_config("tiny", [*SMALL, *extra]))


def make_batch(model: MedUnifier, n: int = 4) -> dict:
    torch.manual_seed(1)
    c = model.config.image
    texts = [TEXTS[i % len(TEXTS)] for i in range(n)]
    batch = model.tokenize(texts)
    batch["pixel_values"] = torch.randn(n, c.channels, c.size, c.size)
    batch["ids"] = [f"s{i}" for i in range(n)]
    batch["prefix_lengths"] = torch.zeros(n, dtype=torch.long)
    return batch


def grads_by_module(model: MedUnifier) -> dict[str, bool]:
    """For each top-level module: did any parameter receive a non-zero gradient?"""
    seen: dict[str, bool] = {}
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        got = param.grad is not None and bool(param.grad.abs().sum() > 0)
        seen[top] = seen.get(top, False) or got
    return seen


def test_forward_returns_every_loss_and_their_weighted_sum() -> None:
    model = small_model()
    out = model(make_batch(model))
    assert set(out.losses) >= {"itc", "itm", "itg", "tig"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    weighted = sum(out.losses[k] for k in ("itc", "itm", "itg", "tig"))
    assert torch.allclose(out.loss, weighted)
    for key in ("itc_acc", "itm_acc", "codebook_usage_top", "perplexity_bottom", "psnr", "itc_global_batch"):
        assert key in out.metrics
    assert out.metrics["itc_global_batch"] == 4
    # the diagnostics stay on the device, detached, so the training loop reads them once per log window
    tensors = {k: v for k, v in out.metrics.items() if k != "itc_global_batch"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in tensors.values())


def test_frozen_vision_gets_no_gradient() -> None:
    model = small_model("vision.frozen=true")
    model.train()
    assert not model.vision.backbone.training  # stays in eval mode
    model(make_batch(model)).loss.backward()
    assert all(p.grad is None for p in model.vision.backbone.parameters())
    # after a convolutional backbone only the output LayerNorm trains (BLIP-2's trainable ln_vision)
    head = {n for n, p in model.vision.named_parameters() if p.grad is not None}
    assert head == ({"post_norm.weight", "post_norm.bias"} if model.vision.backbone_type == "resnet" else set())
    assert grads_by_module(model)["encoder"]


def test_tig_off_generator_untouched_and_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model()

    def boom(*args, **kwargs):
        raise AssertionError("generator ran with TIG off")

    monkeypatch.setattr(model.generator, "forward", boom)
    out = model(make_batch(model), loss_weights=LossWeights(tig=0))
    out.loss.backward()
    assert "tig" not in out.losses
    assert all(p.grad is None for p in model.generator.parameters())


@pytest.mark.parametrize(
    ("objective", "trains", "untouched"),
    [
        ("itc", {"encoder", "image_proj", "text_proj", "temperature"}, {"itm_head", "generator"}),
        ("itm", {"encoder", "itm_head"}, {"image_proj", "text_proj", "temperature", "generator"}),
        ("itg", {"encoder"}, {"image_proj", "text_proj", "itm_head", "temperature", "generator"}),
        ("tig", {"encoder", "generator"}, {"image_proj", "text_proj", "itm_head", "temperature"}),
    ],
)
def test_each_objective_alone_trains_only_its_modules(objective: str, trains: set, untouched: set) -> None:
    model = small_model("vision.frozen=true")
    weights = LossWeights(**{k: float(k == objective) for k in ("itc", "itm", "itg", "tig")})
    out = model(make_batch(model), loss_weights=weights)
    assert set(out.losses) & {"itc", "itm", "itg", "tig"} == {objective}
    out.loss.backward()
    got = grads_by_module(model)
    for name in trains:
        assert got.get(name), f"{objective}: {name} received no gradient"
    for name in untouched:
        assert not got.get(name), f"{objective}: {name} received a gradient"


def test_bf16_autocast_training_step_is_finite() -> None:
    model = small_model()
    batch = make_batch(model)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    out.loss.backward()
    assert all(torch.isfinite(v).all() for v in out.losses.values())
    assert set(out.losses) >= {"itc", "itm", "itg", "tig"}
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("rule", ["exact", "findings"])
def test_itm_negatives_rule_decides_which_reports_are_forbidden(monkeypatch: pytest.MonkeyPatch, rule: str) -> None:
    model = small_model(f"itm_negatives={rule}", "losses.itc=0", "losses.itg=0", "losses.tig=0")
    batch = make_batch(model, n=4)  # four different reports
    batch["labels"] = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.float)  # 0 and 1 say the same
    seen = []

    def spy(sim, forbidden, generator=None):
        seen.append(forbidden.clone())
        return sample_hard_negatives(sim, forbidden, generator)

    monkeypatch.setattr(losses_module, "sample_hard_negatives", spy)
    model(batch)
    assert len(seen) == 2  # a text per image, an image per text
    for forbidden in seen:
        assert forbidden.diagonal().all()
        assert bool(forbidden[0, 1]) == bool(forbidden[1, 0]) == (rule == "findings")
        assert not forbidden[0, 2] and not forbidden[2, 3]


def test_itc_findings_targets_spread_over_same_finding_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model("itc_targets=findings", "losses.itm=0", "losses.itg=0", "losses.tig=0")
    batch = make_batch(model, n=4)  # four different reports
    batch["labels"] = torch.tensor([[1, 0], [1, 0], [0, 1], [-1, -1]], dtype=torch.float)  # 0 and 1 agree
    sims = []

    def spy(image_feats, text_feats, temperature):
        out = itc_similarity(image_feats, text_feats, temperature)
        sims.append(out)
        return out

    monkeypatch.setattr(losses_module, "itc_similarity", spy)
    loss = model(batch).losses["itc"]
    sim_i2t, sim_t2i = sims[0][0].detach(), sims[1][1].detach()
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    expected = 0.5 * (
        -(target * sim_i2t.log_softmax(1)).sum(1).mean() - (target * sim_t2i.log_softmax(1)).sum(1).mean()
    )
    assert torch.allclose(loss.detach(), expected, atol=1e-5)
    model.config.itc_targets = "exact"
    exact = model(batch).losses["itc"]
    assert not torch.allclose(exact.detach(), loss.detach(), atol=1e-4)  # the rule changes the loss
    batch["labels"] = torch.tensor([[1, 0], [0, 0], [0, 1], [-1, -1]], dtype=torch.float)  # all different
    model.config.itc_targets = "findings"
    assert torch.allclose(model(batch).losses["itc"], exact, atol=1e-6)


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = small_model()
    batch = make_batch(model)
    model(batch)  # initialise codebooks
    model.eval()
    with torch.no_grad():
        torch.manual_seed(5)  # ITM draws its hard negatives at random
        before = model(batch)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "config.json").exists()
    loaded = MedUnifier.from_pretrained(tmp_path / "m").eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.manual_seed(5)
        after = loaded(batch)
    for key in before.losses:
        assert torch.allclose(before.losses[key], after.losses[key]), key


def test_public_api_shapes() -> None:
    model = small_model().eval()
    batch = make_batch(model, 2)
    img = model.encode_image(batch["pixel_values"])
    txt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    q, e = model.config.encoder.num_queries, model.config.encoder.embed_dim
    assert img.shape == (2, q, e) and txt.shape == (2, e)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2, q), atol=1e-5)
    assert model.similarity(img, txt).shape == (2, 2)
    scores = model.itm_score(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    top, bottom = model.encode_codes(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    assert top.shape == (2, 4, 4) and bottom.shape == (2, 8, 8)
    recon = model.decode_codes(top, bottom)
    assert recon.shape == batch["pixel_values"].shape
    reports = model.generate_report(batch["pixel_values"], num_beams=2, max_length=8)
    assert len(reports) == 2 and all(isinstance(r, str) for r in reports)


def test_itg_scores_only_answer_tokens_after_the_prefix_and_before_padding() -> None:
    """ITG = mean next-token cross-entropy over the non-padding positions after the question prefix,
    computed here from the full [B, T, V] logits of the same causal pass."""
    model = small_model().eval()
    batch = make_batch(model)
    batch["prefix_lengths"] = torch.tensor([0, 5, 9, 3])
    weights = LossWeights(itc=0, itm=0, itg=1, tig=0)
    with torch.no_grad():
        loss = model(batch, loss_weights=weights).losses["itg"]
        ids = model._task_ids(batch["input_ids"], "dec")
        states = model.encoder(
            input_ids=ids, attention_mask=batch["attention_mask"],
            image_embeds=model.image_features(batch["pixel_values"]), mode="prefix",
            prefix_lengths=batch["prefix_lengths"],
        ).text_states
        logits = model.encoder.lm_logits(states[:, :-1]).float()  # [B, T-1, V]
    terms = []
    for b in range(ids.shape[0]):
        length = int(batch["attention_mask"][b].sum())
        first_answer_token = max(1, int(batch["prefix_lengths"][b]))
        for target in range(first_answer_token, length):  # token `target` is predicted at position target - 1
            terms.append(F.cross_entropy(logits[b, target - 1][None], ids[b, target][None]))
    assert len(terms) < int(batch["attention_mask"][:, 1:].sum())  # the prefixes removed some positions
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_generator_pixel_path_trains_reads_the_image_and_round_trips(tmp_path: Path) -> None:
    """generator.pixel_channels: TIG's gradient reaches the pixel encoder, reconstructions and codes come from the
    images given, and the weights survive save / load."""
    model = small_model("generator.pixel_channels=8")
    batch = make_batch(model)
    out = model(batch, LossWeights(itc=0, itm=0, itg=0, tig=1))
    out.loss.backward()
    assert grads_by_module(model)["generator"]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.pixel_encoder.parameters())
    model.eval()
    args = (batch["input_ids"], batch["attention_mask"])
    px = batch["pixel_values"]
    with torch.no_grad():
        recon = model.reconstruct(px, *args)
        # the same features with other pixels: only the pixel path sees the difference
        model.image_features = lambda pixel_values, cache_keys=None: MedUnifier.image_features(model, px)
        other = model.reconstruct(px.flip(-1), *args)
        del model.image_features
    assert recon.shape == px.shape and not torch.equal(recon, other)
    loaded = MedUnifier.from_pretrained(model.save_pretrained(tmp_path / "m")).eval()
    assert loaded.config.generator.pixel_channels == 8
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(px, *args), recon)
        assert all(torch.equal(a, b) for a, b in zip(model.encode_codes(px, *args), loaded.encode_codes(px, *args)))
