"""ITM re-ranking of retrieval candidates (BLIP-2's protocol): only the top K move, and they move by ITM."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from eval_fakes import CLASSES, FakeModel
from rich.console import Console
from torch import nn

from medunifier.eval.retrieval import RERANK_OFFSET, itm_rerank, run_retrieval

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))


class IdentityITM(nn.Module):
    """ITM that is sure exactly when the image's id (its first vision-token value) equals the text's id."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # gives the model a device

    def itm_score(self, pixel_values, input_ids, attention_mask, *, image_embeds):
        assert pixel_values is None
        return (image_embeds[:, 0, 0] == input_ids[:, 0].float()).float()


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
    assert row[1] == pytest.approx(RERANK_OFFSET + 0.9) and row[2] == pytest.approx(RERANK_OFFSET + 0.8)
    assert row[0] == pytest.approx(0.7) and row[3] == 0.0


def test_rerank_needs_an_itm_head(band_manifest: Path) -> None:
    with pytest.raises(ValueError, match="ITM head"):
        run_retrieval(FakeModel(), band_manifest, None, classes=CLASSES, rerank=3, console=Console(quiet=True))
    with pytest.raises(ValueError, match="rerank"):
        run_retrieval(FakeModel(), band_manifest, None, classes=CLASSES, rerank=-1, console=Console(quiet=True))


def test_itm_score_from_vision_tokens_equals_itm_score_from_pixels() -> None:
    from test_medunifier import make_batch, small_model

    model = small_model().eval()
    batch = make_batch(model)
    from_pixels = model.itm_score(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    tokens = model.image_features(batch["pixel_values"])
    from_tokens = model.itm_score(None, batch["input_ids"], batch["attention_mask"], image_embeds=tokens)
    torch.testing.assert_close(from_tokens, from_pixels)
    with pytest.raises(ValueError, match="exactly one"):
        model.itm_score(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], image_embeds=tokens)
