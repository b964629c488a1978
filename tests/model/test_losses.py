"""Each objective alone, on small hand-made tensors: ITC, the ITM hard-negative sampler and pairs, ITG, TIG,
and the gathers on one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medunifier.model.losses import (
    IGNORE_INDEX,
    contrastive_logits,
    gather_no_grad,
    gather_with_grad,
    hard_negative_mask,
    itc_loss,
    itc_similarity,
    itc_soft_targets,
    itg_labels,
    itm_loss,
    itm_pairs,
    lm_loss,
    same_findings,
    sample_hard_negatives,
    string_keys,
    tig_loss,
)

# ------------------------------------------------------------------------------------------- gathers


def test_gathers_on_one_process_are_the_identity_and_keep_the_gradient() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_grad(x)
    assert y is x
    (y * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(4.0).expand(3, 4))
    ids = torch.tensor([[1, 2], [3, 4]])
    assert gather_no_grad(ids) is ids


# ----------------------------------------------------------------------------------------------- ITC


def _hand_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_i -sum_j target[i, j] log softmax(logits[i])_j, written out with exp and log."""
    log_probs = logits - logits.exp().sum(dim=1, keepdim=True).log()
    return -(target * log_probs).sum(dim=1).mean()


def test_itc_loss_is_the_mean_of_the_two_hand_written_cross_entropies() -> None:
    torch.manual_seed(0)
    image = F.normalize(torch.randn(4, 3, 8), dim=-1)  # [B, Q, E]
    text = F.normalize(torch.randn(4, 8), dim=-1)  # [B, E]
    logits = contrastive_logits(image, text, 0.1)
    assert logits.global_batch == 4 and logits.targets.tolist() == [0, 1, 2, 3]
    sim = torch.stack([torch.stack([(image[i] @ text[t]).max() for t in range(4)]) for i in range(4)]) / 0.1
    torch.testing.assert_close(logits.i2t, sim)
    torch.testing.assert_close(logits.t2i, sim.t())
    loss, acc = itc_loss(logits)
    eye = torch.eye(4)
    torch.testing.assert_close(loss, 0.5 * (_hand_cross_entropy(sim, eye) + _hand_cross_entropy(sim.t(), eye)))
    expected_acc = 0.5 * ((sim.argmax(1) == torch.arange(4)).float().mean()
                          + (sim.t().argmax(1) == torch.arange(4)).float().mean())
    torch.testing.assert_close(acc, expected_acc)


def test_itc_label_smoothing_and_soft_targets_match_the_hand_written_form() -> None:
    torch.manual_seed(1)
    logits = contrastive_logits(F.normalize(torch.randn(3, 2, 5), dim=-1), F.normalize(torch.randn(3, 5), dim=-1),
                                0.07)
    smooth = 0.9 * torch.eye(3) + 0.1 / 3
    loss, _ = itc_loss(logits, label_smoothing=0.1)
    torch.testing.assert_close(loss, 0.5 * (_hand_cross_entropy(logits.i2t, smooth)
                                            + _hand_cross_entropy(logits.t2i, smooth)))
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    loss, _ = itc_loss(logits, soft)
    torch.testing.assert_close(loss, 0.5 * (_hand_cross_entropy(logits.i2t, soft)
                                            + _hand_cross_entropy(logits.t2i, soft)))


def test_itc_soft_targets_spread_over_identical_texts_and_same_findings() -> None:
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 7, 2], [1, 5, 2]])  # 0 and 3 are the same text
    labels = torch.tensor([[1, 0], [-1, -1], [1, 0], [0, 1]], dtype=torch.float)  # 0 and 2 agree; 1 unknown
    target = itc_soft_targets(ids, labels, torch.arange(4), pad_id=0, max_length=8)
    expected = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.float)
    torch.testing.assert_close(target, expected / expected.sum(1, keepdim=True))
    exact = itc_soft_targets(ids, None, torch.arange(4), pad_id=0, max_length=8)
    assert exact[0].tolist() == [0.5, 0.0, 0.0, 0.5] and exact[1].tolist() == [0.0, 1.0, 0.0, 0.0]


def test_itc_gradient_reaches_both_sides_and_the_temperature() -> None:
    image = F.normalize(torch.randn(3, 2, 4), dim=-1).requires_grad_(True)
    text = F.normalize(torch.randn(3, 4), dim=-1).requires_grad_(True)
    temperature = torch.tensor(0.07, requires_grad=True)
    itc_loss(contrastive_logits(image, text, temperature))[0].backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and temperature.grad != 0


def test_itc_matches_reference_loops() -> None:
    torch.manual_seed(0)
    image = F.normalize(torch.randn(3, 5, 8), dim=-1)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    sim_i2t, sim_t2i = itc_similarity(image, text, 0.07)
    expected = torch.empty(3, 3)
    for i in range(3):
        for t in range(3):
            expected[i, t] = max(float(image[i, q] @ text[t]) for q in range(5)) / 0.07
    assert torch.allclose(sim_i2t, expected, atol=1e-5)
    assert torch.allclose(sim_t2i, expected.t(), atol=1e-5)


def test_itc_logits_stay_float32_under_bf16_autocast() -> None:
    image = F.normalize(torch.randn(3, 5, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    reference, _ = itc_similarity(image, text, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim, _ = itc_similarity(image, text, 0.07)
    assert sim.dtype == torch.float32 and torch.equal(sim, reference)


# ----------------------------------------------------------------------------------------------- ITM


def test_hard_negatives_never_positive_or_duplicate() -> None:
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 5
    sim.fill_diagonal_(100.0)  # the positive would always win without the mask
    forbidden = torch.eye(6, dtype=torch.bool)
    forbidden[0, 3] = forbidden[3, 0] = True  # samples 0 and 3 are duplicates
    sim[0, 3] = 100.0
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, forbidden, gen) for _ in range(300)])  # [300, 6]
    rows = torch.arange(6).expand_as(draws)
    assert not forbidden[rows, draws].any()
    # hard: the most similar allowed candidate is drawn most often
    sim_allowed = sim.masked_fill(forbidden, -1e9)
    best = sim_allowed.argmax(1)
    mode = torch.mode(draws, dim=0).values
    assert (mode == best).float().mean() >= 0.8


def test_same_findings_matches_label_vectors_and_ignores_unlabelled() -> None:
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, -1], [-1, -1, -1], [-1, -1, -1]], dtype=torch.float)
    same = same_findings(labels, labels)
    assert same[0, 1] and same[1, 0] and same[2, 2]
    assert not same[0, 2] and not same[1, 2]
    assert not same[3].any() and not same[:, 4].any()  # no known label: never a duplicate by labels


def test_hard_negative_fallback_when_everything_is_a_duplicate() -> None:
    forbidden = torch.ones(3, 3, dtype=torch.bool)
    idx = sample_hard_negatives(torch.zeros(3, 3), forbidden)
    assert idx.shape == (3,) and (idx >= 0).all() and (idx < 3).all()


def test_hard_negative_mask_forbids_the_positive_same_texts_same_images_and_same_findings() -> None:
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 7, 2], [1, 5, 2], [1, 8, 2]])  # 0 and 3: the same text
    keys = string_keys(["a", "b", "c", "d", "b"], torch.device("cpu"))  # 1 and 4: the same image
    labels = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 0], [-1, -1]], dtype=torch.float)  # 0 and 2 agree
    exact = hard_negative_mask(ids, ids, keys, keys)
    expected = torch.eye(5, dtype=torch.bool)
    expected[0, 3] = expected[3, 0] = expected[1, 4] = expected[4, 1] = True
    assert torch.equal(exact, expected)
    by_findings = hard_negative_mask(ids, ids, keys, keys, labels)
    expected[0, 2] = expected[2, 0] = True
    assert torch.equal(by_findings, expected)


def test_sampler_never_draws_the_positive_or_a_same_finding_sample_even_when_they_are_the_most_similar() -> None:
    n = 6
    ids = torch.arange(n)[:, None].repeat(1, 3)  # all texts differ
    keys = string_keys([str(i) for i in range(n)], torch.device("cpu"))
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1], [-1, -1]], dtype=torch.float)
    forbidden = hard_negative_mask(ids, ids, keys, keys, labels)  # pairs (0, 1) and (2, 3) share findings
    sim = torch.zeros(n, n)
    sim[forbidden] = 50.0  # the forbidden candidates would win nearly every draw without the mask
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, forbidden, gen) for _ in range(200)])  # [200, n]
    rows = torch.arange(n).expand_as(draws)
    assert not (draws == rows).any()
    assert not forbidden[rows, draws].any()

    assert not set(draws[:, 0].tolist()) & {0, 1} and not set(draws[:, 2].tolist()) & {2, 3}


def test_itm_pairs_hold_the_positives_then_a_negative_text_then_a_negative_image() -> None:
    torch.manual_seed(0)
    bsz = 4
    embeds = torch.randn(bsz, 3, 5, requires_grad=True)  # [B, 1 + L, Dv]
    ids = torch.tensor([[1, 5, 2, 0], [1, 6, 7, 2], [1, 8, 2, 0], [1, 9, 2, 0]])
    mask = (ids != 0).long()
    logits = contrastive_logits(F.normalize(torch.randn(bsz, 2, 4), dim=-1), F.normalize(torch.randn(bsz, 4), dim=-1),
                                0.1)
    modality_ids = torch.tensor([1, 2, 1, 0])
    pairs = itm_pairs(embeds, ids, mask, logits, sample_ids=["a", "b", "c", "d"], pad_id=0, max_length=8,
                      modality_ids=modality_ids)
    assert pairs.labels.tolist() == [1] * bsz + [0] * 2 * bsz
    assert torch.equal(pairs.input_ids[:bsz], ids) and torch.equal(pairs.input_ids[2 * bsz:], ids)
    assert torch.equal(pairs.image_embeds[:2 * bsz], torch.cat([embeds, embeds]))
    neg_text = [int((ids == row).all(1).nonzero()) for row in pairs.input_ids[bsz:2 * bsz]]
    neg_image = [int((embeds == e).all(-1).all(-1).nonzero()) for e in pairs.image_embeds[2 * bsz:]]
    assert all(j != i for i, j in enumerate(neg_text)) and all(j != i for i, j in enumerate(neg_image))
    assert torch.equal(pairs.attention_mask[bsz:2 * bsz], mask[neg_text])
    assert torch.equal(pairs.modality_ids, torch.cat([modality_ids, modality_ids, modality_ids[neg_image]]))
    pairs.image_embeds.sum().backward()  # the negative images keep their gradient path
    assert (embeds.grad >= 2).all()


def test_itm_loss_is_the_cross_entropy_and_its_accuracy() -> None:
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, -1.0]])
    labels = torch.tensor([1, 1, 0])
    loss, acc = itm_loss(logits, labels)
    expected = -(logits.log_softmax(1)[torch.arange(3), labels]).mean()
    torch.testing.assert_close(loss, expected)
    assert float(acc) == pytest.approx(2 / 3) and not acc.requires_grad


# ----------------------------------------------------------------------------------------------- ITG


def test_itg_labels_ignore_padding_and_the_question_prefix() -> None:
    ids = torch.tensor([[9, 4, 5, 6, 0], [9, 7, 8, 0, 0]])
    mask = (ids != 0).long()
    ignore = IGNORE_INDEX
    assert itg_labels(ids, mask).tolist() == [[4, 5, 6, ignore], [7, 8, ignore, ignore]]
    # a prefix of 3 tokens: targets 1 and 2 belong to the question
    assert itg_labels(ids, mask, torch.tensor([3, 0])).tolist() == [[ignore, ignore, 6, ignore], [7, 8, ignore, ignore]]


def test_lm_loss_scores_only_the_labelled_positions_and_padding_changes_nothing() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 10)
    states = torch.randn(2, 5, 6)
    ids = torch.tensor([[9, 4, 5, 6, 0], [9, 7, 8, 0, 0]])
    mask = (ids != 0).long()
    loss = lm_loss(states, itg_labels(ids, mask), head)
    terms = [F.cross_entropy(head(states[b, t - 1])[None], ids[b, t][None])
             for b in range(2) for t in range(1, int(mask[b].sum()))]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    # whatever sits at the padded positions (states and token ids) does not move the loss
    states2, ids2 = states.clone(), ids.clone()
    states2[1, 3:] = 100.0
    ids2[1, 3:] = 3
    assert torch.equal(lm_loss(states2, itg_labels(ids2, mask), head), loss)
    smoothed = lm_loss(states, itg_labels(ids, mask), head, label_smoothing=0.1)
    assert not torch.equal(smoothed, loss)


# ----------------------------------------------------------------------------------------------- TIG


def test_tig_loss_is_mse_plus_both_commitment_terms() -> None:
    images, targets = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    loss, mse = tig_loss(images, targets, torch.tensor(0.25), torch.tensor(0.125))
    assert float(mse) == 0.25 and float(loss) == 0.25 + 0.25 + 0.125
