"""ITM re-ranking of retrieval candidates (BLIP-2's protocol): only the top K move, and they move by ITM log-odds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_fakes import CLASSES, FakeModel
from rich.console import Console
from torch import nn

from medunifier.config import load_config
from medunifier.eval.retrieval import RERANK_OFFSET, itm_rerank, run_retrieval
from medunifier.model.medunifier import MedUnifier
from shrunk_config import SMALL_MODEL

QUIET = Console(quiet=True)


class IdentityITM(nn.Module):
    """ITM that is sure exactly when the image's id (its first vision-token value) equals the text's id."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # gives the model a device

    def itm_logits(self, pixel_values, input_ids, attention_mask, *, image_embeds):
        assert pixel_values is None
        match = (image_embeds[:, 0, 0] == input_ids[:, 0].float()).float()
        return torch.stack([torch.zeros_like(match), 5 * match], dim=1)  # log-odds 5 for the true pair, else 0


def _setup(n: int = 6) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    ids = torch.arange(n, dtype=torch.float32)
    vision = ids[:, None, None].expand(n, 2, 3).clone()  # [N, 2, 3]: image i carries id i
    tokens = {"input_ids": torch.arange(n)[:, None].repeat(1, 4), "attention_mask": torch.ones(n, 4, dtype=torch.long)}
    # ITC puts every image's own text third: text i+1 and i+2 (mod n) score higher
    sim = torch.full((n, n), 0.0)
    for i in range(n):
        sim[i, (i + 1) % n], sim[i, (i + 2) % n], sim[i, i] = 0.9, 0.8, 0.7
    return vision, tokens, sim


def test_rerank_moves_the_true_pair_up_only_when_it_is_among_the_k() -> None:
    vision, tokens, sim = _setup()
    i2t, t2i = itm_rerank(IdentityITM(), vision, tokens, sim, k=3, batch_size=4)
    assert (i2t.argmax(1) == torch.arange(6)).all() and (t2i.argmax(1) == torch.arange(6)).all()
    i2t, _ = itm_rerank(IdentityITM(), vision, tokens, sim, k=2)
    assert (i2t.argmax(1) == (torch.arange(6) + 1) % 6).all()  # the true text is third: out of reach at K=2
    # the candidates keep ITC's order among themselves when ITM ties, and stay ahead of the others
    row = i2t[0]
    assert row[1] == pytest.approx(0.9) and row[2] == pytest.approx(0.8)
    assert row[0] == pytest.approx(0.7 - RERANK_OFFSET) and row[3] == -RERANK_OFFSET


class ConfidentITM(IdentityITM):
    """ITM sure of every pair: log-odds 20 + the text's id, a match probability of 1.0 in float32 for all."""

    def itm_logits(self, pixel_values, input_ids, attention_mask, *, image_embeds):
        return torch.stack([torch.zeros(len(input_ids)), 20 + input_ids[:, 0].float()], dim=1)


def test_rerank_reads_log_odds_where_the_probability_saturates() -> None:
    vision, tokens, _ = _setup(3)
    sim = torch.tensor([[0.9, 0.8, 0.0], [0.9, 0.8, 0.0], [0.9, 0.8, 0.0]])  # ITC prefers text 0
    assert ConfidentITM().itm_logits(None, tokens["input_ids"], None, image_embeds=vision).softmax(-1)[:, 1].eq(1).all()
    i2t, _ = itm_rerank(ConfidentITM(), vision, tokens, sim, k=2)
    assert (i2t.argmax(1) == 1).all()  # text 1's larger log-odds outweighs ITC's 0.1


def test_rerank_needs_an_itm_head(band_manifest: Path) -> None:
    with pytest.raises(ValueError, match="ITM head"):
        run_retrieval(FakeModel(), band_manifest, None, classes=CLASSES, rerank=3, console=Console(quiet=True))
    with pytest.raises(ValueError, match="rerank"):
        run_retrieval(FakeModel(), band_manifest, None, classes=CLASSES, rerank=-1, console=Console(quiet=True))


def _small_model() -> MedUnifier:
    torch.manual_seed(0)
    return MedUnifier(load_config("tiny", [*SMALL_MODEL, "encoder.dropout=0.0"])).eval()


def test_scores_from_vision_tokens_equal_scores_from_pixels() -> None:
    model = _small_model()
    c = model.config.image
    pixels = torch.randn(3, c.channels, c.size, c.size, generator=torch.Generator().manual_seed(1))
    tok = model.tokenize(["mild cardiomegaly", "small left pleural effusion", "the lungs are clear"])
    tokens = model.image_features(pixels)
    torch.testing.assert_close(model.encode_image(None, image_embeds=tokens), model.encode_image(pixels))
    torch.testing.assert_close(model.itm_score(None, tok["input_ids"], tok["attention_mask"], image_embeds=tokens),
                               model.itm_score(pixels, tok["input_ids"], tok["attention_mask"]))
    for method in (model.encode_image, lambda *a, **k: model.itm_score(*a, tok["input_ids"], tok["attention_mask"],
                                                                       **k)):
        with pytest.raises(ValueError, match="exactly one"):
            method(pixels, image_embeds=tokens)


def test_rerank_keeps_the_itc_similarities_and_figures(band_manifest: Path, monkeypatch) -> None:
    import numpy as np

    import medunifier.eval.retrieval as retrieval

    seen = []
    scores = retrieval.retrieval_scores

    def recording(sim, *args, **kwargs):
        seen.append(np.array(sim))
        return scores(sim, *args, **kwargs)

    monkeypatch.setattr(retrieval, "retrieval_scores", recording)
    model = _small_model()
    plain = run_retrieval(model, band_manifest, None, classes=CLASSES, ks=(1, 5), console=QUIET)
    ranked = run_retrieval(model, band_manifest, None, classes=CLASSES, ks=(1, 5), rerank=5, console=QUIET)
    # the one-pass path (vision tokens once, ITC from them) gives the ITC similarities of the plain path
    itc_plain, itc_ranked, reranked = seen
    assert np.ptp(itc_plain) > 0  # the images are told apart, so a wrong embedding would show
    np.testing.assert_allclose(itc_ranked, itc_plain, rtol=1e-5, atol=1e-6)
    assert ranked["itc_only"]["image_to_text"]["mean_rank"] == pytest.approx(plain["image_to_text"]["mean_rank"])
    # exactly K candidates per query are lifted above the rest, and each is among ITC's top K (ties allowed)
    lifted = reranked > -RERANK_OFFSET / 2
    assert (lifted.sum(1) == 5).all()
    kth = np.sort(itc_plain, axis=1)[:, -5][:, None]
    assert (itc_plain[lifted.nonzero()] >= np.broadcast_to(kth, itc_plain.shape)[lifted.nonzero()] - 1e-6).all()
    assert ranked["rerank"] == 5 and "itc_only" not in plain
