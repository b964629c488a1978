"""Report drafts chosen by the model's own image-text matching (`MedUnifier.generate_report(candidates=N)`).

Beam search returns the most probable report, and on a small corpus the most probable report leans to the
normal study: it names fewer findings than the image shows. The same model's ITM head was trained to tell
a report from one that differs in a finding (hard negatives with other finding labels), so it can judge
drafts: each image gets N drafts (the beam-search one and N - 1 nucleus samples) and keeps the one with
the highest ITM match log-odds + ITC similarity (the score BLIP-2 re-ranks retrieval candidates with,
`eval.retrieval.itm_rerank`) + the decoder's mean token log-likelihood of the draft given the image (which
keeps the matching terms from preferring a draft that names findings at any cost).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from medunifier.model.losses import IGNORE_INDEX, itg_labels

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

__all__ = ["matching_scores", "mean_log_likelihood", "pick_by_matching"]


@torch.no_grad()
def matching_scores(model: MedUnifier, image_embeds: Tensor, texts: list[str],
                    modalities: list[str] | None = None, image_itc: Tensor | None = None) -> Tensor:
    """ITM match log-odds + ITC similarity (max over queries) + mean token log-likelihood (`mean_log_likelihood`)
    of each (image, text) pair: [P].

    Args:
        model: the model whose ITM head and ITC projections judge.
        image_embeds: [P, N, D] vision tokens (`image_features`), one row per pair.
        texts: P texts.
        modalities: one per pair, or None.
        image_itc: [P, Q, E] the pairs' ITC image embeddings (`encode_image`) when already computed.
    """
    tokens = model.tokenize(texts)
    logits = model.itm_logits(None, tokens["input_ids"], tokens["attention_mask"], image_embeds=image_embeds,
                              modalities=modalities).float()  # [P, 2]
    image = image_itc if image_itc is not None else model.encode_image(None, image_embeds=image_embeds,
                                                                       modalities=modalities)  # [P, Q, E]
    text = model.encode_text(tokens["input_ids"], tokens["attention_mask"], modalities=modalities)  # [P, E]
    itc = torch.einsum("pqe,pe->pq", image.float(), text.float()).amax(dim=-1)  # [P]
    return logits[:, 1] - logits[:, 0] + itc + mean_log_likelihood(model, image_embeds, tokens, modalities)


@torch.no_grad()
def mean_log_likelihood(model: MedUnifier, image_embeds: Tensor, tokens: dict[str, Tensor],
                        modalities: list[str] | None = None) -> Tensor:
    """The decoder's mean log-probability per token of each text given its image (ITG's pass): [P]."""
    ids = model._task_ids(tokens["input_ids"], "dec")  # [P, T]
    out = model.encoder(input_ids=ids, attention_mask=tokens["attention_mask"], image_embeds=image_embeds,
                        mode="causal", modality_ids=model.modality_ids_for(modalities, ids.shape[0]))
    labels = itg_labels(ids, tokens["attention_mask"])  # [P, T-1]
    scored = labels != IGNORE_INDEX
    logits = model.encoder.lm_logits(out.text_states[:, :-1]).float()  # [P, T-1, V]
    log_p = logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]  # [P, T-1]
    return (log_p * scored).sum(1) / scored.sum(1).clamp_min(1)


@torch.no_grad()
def pick_by_matching(model: MedUnifier, image_embeds: Tensor, drafts: list[list[str]],
                     modalities: list[str] | None = None) -> list[str]:
    """For each image, its draft with the highest `matching_scores` (ties: the earliest draft).

    Args:
        image_embeds: [B, N, D] the images' vision tokens.
        drafts: K lists of B texts: drafts[k][b] is image b's k-th draft.
        modalities: one per image, or None.
    """
    batch, k = image_embeds.shape[0], len(drafts)
    if k == 0 or any(len(d) != batch for d in drafts):
        raise ValueError(f"drafts must be K >= 1 lists of {batch} texts, one per image")
    texts = [drafts[j][b] for b in range(batch) for j in range(k)]  # image-major: [B * K]
    pairs = image_embeds.repeat_interleave(k, dim=0)  # [B * K, N, D]
    pair_modalities = [m for m in modalities for _ in range(k)] if modalities is not None else None
    image_itc = model.encode_image(None, image_embeds=image_embeds, modalities=modalities)  # [B, Q, E], once an image
    scores = matching_scores(model, pairs, texts, pair_modalities, image_itc.repeat_interleave(k, dim=0))
    best = scores.view(batch, k).argmax(dim=1)  # [B]
    return [drafts[int(j)][b] for b, j in enumerate(best)]
