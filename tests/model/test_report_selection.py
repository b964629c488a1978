"""Report drafts chosen by the model's own matching: scores per pair, the choice per image, and
`generate_report(candidates=N)` against drafts made by hand."""

from __future__ import annotations

import pytest
import torch
from test_medunifier import TEXTS, make_batch, small_model

import medunifier.model.report_selection as selection


def test_batched_scores_are_each_pairs_own() -> None:
    model = small_model().eval()
    pixels = make_batch(model, 2)["pixel_values"]
    with torch.no_grad():
        embeds = model.image_features(pixels)  # [2, N, D]
    pairs = embeds.repeat_interleave(2, dim=0)  # image 0 twice, then image 1 twice
    texts = [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[3]]
    together = selection.matching_scores(model, pairs, texts)
    alone = torch.cat([selection.matching_scores(model, pairs[i:i + 1], [texts[i]]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    given = selection.matching_scores(model, pairs, texts, image_itc=model.encode_image(None, image_embeds=pairs))
    torch.testing.assert_close(given, together)
    # the score is ITM log-odds plus the ITC similarity, so it is not the same for every text of one image
    assert together[0] != together[1]


def test_each_image_keeps_its_own_best_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model().eval()
    with torch.no_grad():
        embeds = model.image_features(make_batch(model, 3)["pixel_values"])  # [3, N, D]
    drafts = [["a", "bbbb", "cc"], ["aaa", "b", "cccc"], ["aa", "bb", "c"]]  # drafts[k][b]
    seen: dict[str, object] = {}

    def by_length(_model, pair_embeds, texts, modalities=None, image_itc=None):  # a judge preferring long texts
        seen.update(embeds=pair_embeds, texts=list(texts), image_itc=image_itc)
        return torch.tensor([float(len(t)) for t in texts])

    monkeypatch.setattr(selection, "matching_scores", by_length)
    assert selection.pick_by_matching(model, embeds, drafts) == ["aaa", "bbbb", "cccc"]
    # pairs are image-major: image b's row beside each of its drafts
    assert seen["texts"] == ["a", "aaa", "aa", "bbbb", "b", "bb", "cc", "cccc", "c"]
    assert torch.equal(seen["embeds"], embeds.repeat_interleave(3, dim=0))
    # the ITC image embeddings were computed once an image and repeated in the same order
    expected_itc = model.encode_image(None, image_embeds=embeds).repeat_interleave(3, dim=0)
    torch.testing.assert_close(seen["image_itc"], expected_itc)
    with pytest.raises(ValueError, match="one per image"):
        selection.pick_by_matching(model, embeds, [["a", "b"]])


def test_generate_report_with_candidates_keeps_the_best_of_its_drafts() -> None:
    model = small_model().eval()
    pixels = make_batch(model, 2)["pixel_values"]
    kwargs = dict(num_beams=2, max_length=8)
    beam = model.generate_report(pixels, **kwargs)
    g = torch.Generator().manual_seed(5)
    samples = [model.generate_report(pixels, top_p=0.9, max_length=8, generator=g) for _ in range(2)]
    with torch.no_grad():
        expected = selection.pick_by_matching(model, model.image_features(pixels), [beam, *samples])
    chosen = model.generate_report(pixels, **kwargs, candidates=3, generator=torch.Generator().manual_seed(5))
    assert chosen == expected
    assert model.generate_report(pixels, **kwargs, candidates=1) == beam
    with pytest.raises(ValueError, match="candidates"):
        model.generate_report(pixels, candidates=0)
    prefix = torch.full((2, 3), model.special["dec"])
    with pytest.raises(ValueError, match="question prefixes"):
        model.generate_report(pixels, candidates=2, prefix_ids=prefix, prefix_mask=torch.ones_like(prefix))


def test_mean_log_likelihood_is_minus_the_itg_loss_of_each_text() -> None:
    model = small_model().eval()
    batch = make_batch(model, 2)
    with torch.no_grad():
        embeds = model.image_features(batch["pixel_values"])
        both = selection.mean_log_likelihood(model, embeds, model.tokenize(TEXTS[:2]))
        for i in range(2):
            tokens = model.tokenize([TEXTS[i]])
            itg = model._itg_loss(embeds[i:i + 1], tokens["input_ids"], tokens["attention_mask"], None)
            torch.testing.assert_close(both[i], -itg, atol=1e-4, rtol=1e-4)
