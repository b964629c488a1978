"""MedUnifier's training objectives as functions of tensors, in the manner of open_clip's `loss.py`.

    ITC  contrastive_logits -> itc_loss       symmetric InfoNCE over the global batch (the all-gather is inside),
                                              hard targets or same-finding soft targets (`itc_soft_targets`),
                                              optionally mixed with a teacher's (`itc_teacher_targets`,
                                              `mix_itc_targets`)
    ITM  itm_pairs -> (encoder, ITM head) -> itm_loss
                                              one hard negative text per image and one hard negative image per
                                              text (`hard_negative_mask`, `sample_hard_negatives`)
    ITG  itg_labels -> lm_loss                next-token cross-entropy on the scored positions only
    TIG  tig_loss, tig_terms                  MSE + the two VQ commitment terms, and the TIG diagnostics

The networks that make the features (vision tower, encoder passes, heads, generator) stay in
`MedUnifier.forward`, which composes these functions. Distributed training: every rank gathers the global
batch here, `gather_with_grad` for features that are trained through the other ranks' losses and
`gather_no_grad` for ids, masks, keys and labels; on one process both are the identity.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from medunifier.utils import ChannelStat, process_group_rank_world, psnr_normalised

if TYPE_CHECKING:
    from medunifier.model.generator import GeneratorOutput

__all__ = [
    "ContrastiveLogits", "ItmPairs", "contrastive_logits", "gather_no_grad", "gather_with_grad",
    "hard_negative_mask", "itc_loss", "itc_similarity", "itc_soft_targets", "itc_teacher_targets", "itg_labels",
    "itm_loss", "itm_pairs", "lm_loss", "mix_itc_targets", "pad_for_gather", "same_findings", "same_report",
    "sample_hard_negatives", "string_keys", "tig_loss", "tig_terms",
]

IGNORE_INDEX = -100  # label of a position the LM loss does not score (F.cross_entropy's ignore_index)


# ------------------------------------------------------------------------------------- distributed


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each rank the summed gradient of its own rows.

    Every rank's loss uses every rank's rows, so the gradient of rank r's rows is the sum over ranks of
    each loss's gradient with respect to them: an all-reduce of the gathered gradient, then rank r's
    slice. DDP's averaging of parameter gradients then gives the gradient of the mean loss. Written on
    the public `all_gather`/`all_reduce` (gloo and NCCL) since `torch.distributed.nn.functional` is
    deprecated. Every rank must pass the same shape.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        rank, world = process_group_rank_world()
        shards = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shards, x.contiguous())
        ctx.rows = (rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(shards, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start, end = ctx.rows
        return grad[start:end]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 keeping the gradient of the local shard; `x` itself on one process.

    Args:
        x: [B, ...], the same shape on every rank.
    Returns:
        [world * B, ...], rank r's rows at r * B.
    """
    _, world = process_group_rank_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 without gradient (ids, masks, keys, labels); `x` itself on one process."""
    _, world = process_group_rank_world()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def pad_for_gather(text: Tensor, max_length: int, value: int) -> Tensor:
    """Token ids or a mask [B, T] padded to [B, max_length] when several ranks gather it (each rank pads its
    batch to its own longest text); unchanged on one process."""
    if process_group_rank_world()[1] == 1:
        return text
    return F.pad(text, (0, max_length - text.shape[1]), value=value)


def string_keys(ids: Sequence[str], device: torch.device) -> Tensor:
    """Sample ids -> CRC32 keys [B] long, comparable across ranks after a gather."""
    return torch.tensor([zlib.crc32(str(i).encode()) for i in ids], dtype=torch.long, device=device)


def _global_index(bsz: int, device: torch.device) -> Tensor:
    """[B]: each local sample's index in the global batch."""
    rank, _ = process_group_rank_world()
    return torch.arange(bsz, device=device) + rank * bsz


# ----------------------------------------------------------------------------------------------- ITC


def itc_similarity(image_feats: Tensor, text_feats: Tensor, temperature: Tensor | float) -> tuple[Tensor, Tensor]:
    """Max-over-queries similarity (paper eq. ITC).

    image_feats [Bi, Q, E] and text_feats [Bt, E], both L2-normalised.
    Returns (sim_i2t [Bi, Bt], sim_t2i [Bt, Bi]), already divided by the temperature.
    """
    with torch.autocast(device_type=image_feats.device.type, enabled=False):  # logits in float32 under autocast
        sim = torch.einsum("iqe,te->itq", image_feats.float(), text_feats.float()).amax(dim=-1)  # [Bi, Bt]
    sim = sim / temperature
    return sim, sim.t()


@dataclass
class ContrastiveLogits:
    """The local batch against the global one.

    i2t: [B, B_all] each local image against every text; t2i: [B, B_all] each local text against every image;
    targets: [B] the global index of each local sample's own pair; global_batch: B_all.
    """

    i2t: Tensor
    t2i: Tensor
    targets: Tensor
    global_batch: int


def contrastive_logits(image_feats: Tensor, text_feats: Tensor, temperature: Tensor | float) -> ContrastiveLogits:
    """Gather both sides over the ranks (with gradient) and score the local samples against the global batch.

    Args:
        image_feats: [B, Q, E] normalised query embeddings g_q.
        text_feats: [B, E] normalised text embeddings g_t.
        temperature: the ITC temperature (the logits are divided by it).
    """
    all_image_feats = gather_with_grad(image_feats)
    all_text_feats = gather_with_grad(text_feats)
    sim_i2t, _ = itc_similarity(image_feats, all_text_feats, temperature)  # [B, B_all]
    _, sim_t2i = itc_similarity(all_image_feats, text_feats, temperature)  # [B, B_all]
    targets = _global_index(image_feats.shape[0], image_feats.device)
    return ContrastiveLogits(sim_i2t, sim_t2i, targets, int(all_text_feats.shape[0]))


def same_findings(labels: Tensor, all_labels: Tensor) -> Tensor:
    """[B, N] bool: True where two samples' finding labels [B, F] / [N, F] are identical.

    Labels are 1 present, 0 absent, -1 unknown; a sample with no known label matches nothing, so
    unlabelled data keeps the exact-duplicate rule only.
    """
    same = labels[:, None, :].eq(all_labels[None, :, :]).all(-1)
    known = (labels >= 0).any(-1)[:, None] & (all_labels >= 0).any(-1)[None, :]
    return same & known


def same_report(input_ids: Tensor, all_ids: Tensor, labels: Tensor | None = None) -> Tensor:
    """[B, B_all] bool: identical token ids [B, T] / [B_all, T], or (when `labels` [B, F] is given, gathered
    here) the same finding labels."""
    same = input_ids[:, None, :].eq(all_ids[None, :, :]).all(-1)
    if labels is not None:
        labels = labels.to(input_ids.device)
        same |= same_findings(labels, gather_no_grad(labels))
    return same


def itc_soft_targets(input_ids: Tensor, labels: Tensor | None, targets: Tensor, *, pad_id: int,
                     max_length: int) -> Tensor:
    """ITC targets [B, B_all] spread evenly over the positives: the paired sample, identical texts and
    same-finding samples.

    Symmetric in images and texts: sample j is a positive of sample i for both ITC directions, since each
    index of the global batch stands for one (image, text) pair.

    Args:
        input_ids: [B, T] the local texts.
        labels: [B, F] finding labels (1, 0, -1 unknown), or None (identical texts only).
        targets: [B] each local sample's global index (`ContrastiveLogits.targets`).
        pad_id, max_length: how to pad the texts to one width before the gather.
    """
    input_ids = pad_for_gather(input_ids, max_length, pad_id)
    positive = same_report(input_ids, gather_no_grad(input_ids), labels)
    positive[torch.arange(input_ids.shape[0], device=input_ids.device), targets] = True
    positive = positive.float()
    return positive / positive.sum(dim=1, keepdim=True)


def itc_teacher_targets(teacher_image: Tensor, teacher_text: Tensor) -> tuple[Tensor, Tensor]:
    """A teacher's probabilities over the global batch, one per direction: ([B, B_all] image-to-text,
    [B, B_all] text-to-image), rows in the order of `contrastive_logits`.

    Args:
        teacher_image: [B, E] the local images' teacher embeddings, already multiplied by its logit scale.
        teacher_text: [B, E] the local texts' teacher embeddings (normalised).
    """
    all_images, all_texts = gather_no_grad(teacher_image), gather_no_grad(teacher_text)  # [B_all, E]
    with torch.autocast(device_type=teacher_image.device.type, enabled=False):
        i2t = (teacher_image.float() @ all_texts.float().t()).softmax(dim=-1)  # [B, B_all]
        t2i = (teacher_text.float() @ all_images.float().t()).softmax(dim=-1)  # [B, B_all]
    return i2t, t2i


def mix_itc_targets(target: Tensor | None, logits: ContrastiveLogits, teacher: tuple[Tensor, Tensor],
                    alpha: float) -> tuple[Tensor, Tensor]:
    """(1 - alpha) * the ITC targets + alpha * the teacher's, per direction (ALBEF's distillation).

    Args:
        target: [B, B_all] probabilities, or None for the paired sample alone.
        logits: from `contrastive_logits` (the paired sample's index and the global batch).
        teacher: from `itc_teacher_targets`.
        alpha: the teacher's share, in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the teacher's share must lie in [0, 1], got {alpha}")
    if target is None:
        target = F.one_hot(logits.targets, logits.global_batch).float()  # [B, B_all]
    return (1.0 - alpha) * target + alpha * teacher[0], (1.0 - alpha) * target + alpha * teacher[1]


def itc_loss(logits: ContrastiveLogits, target: Tensor | tuple[Tensor, Tensor] | None = None,
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """(loss [], accuracy []) of the symmetric InfoNCE: the mean of the image-to-text and text-to-image
    cross-entropies.

    Args:
        logits: from `contrastive_logits`.
        target: [B, B_all] probabilities for both directions (`itc_soft_targets`), a pair of them
            (image-to-text, text-to-image; `mix_itc_targets`), or None for the paired sample alone.
        label_smoothing: of both cross-entropies.
    The accuracy counts the paired sample as the answer in both directions.
    """
    target = logits.targets if target is None else target
    target_i2t, target_t2i = target if isinstance(target, tuple) else (target, target)
    loss = 0.5 * (
        F.cross_entropy(logits.i2t, target_i2t, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.t2i, target_t2i, label_smoothing=label_smoothing)
    )
    acc = 0.5 * ((logits.i2t.argmax(1) == logits.targets).float().mean()
                 + (logits.t2i.argmax(1) == logits.targets).float().mean())
    return loss, acc


# ----------------------------------------------------------------------------------------------- ITM


def sample_hard_negatives(sim: Tensor, forbidden: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One hard negative per row, drawn from softmax(sim) with forbidden entries (positive, duplicates) masked.

    sim [B, N], forbidden [B, N] bool. A row with no allowed entry falls back to uniform over the allowed set,
    or (when everything is forbidden) to any other index.
    """
    weights = torch.softmax(sim.float(), dim=1).masked_fill(forbidden, 0.0)
    weights = torch.nan_to_num(weights, nan=0.0)
    # the fallback is computed for every row and taken where needed: no host-device sync in the training step
    empty = weights.sum(dim=1, keepdim=True) <= 0  # [B, 1]
    fallback = (~forbidden).float()
    fallback = fallback.masked_fill(fallback.sum(dim=1, keepdim=True) <= 0, 1.0)
    weights = torch.where(empty, fallback, weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def hard_negative_mask(input_ids: Tensor, all_ids: Tensor, image_keys: Tensor, all_image_keys: Tensor,
                       labels: Tensor | None = None) -> Tensor:
    """[B, B_all] bool: the candidates that may not be a sample's hard negative.

    Forbidden are the positive itself, identical texts, the same image (equal keys) and, when `labels`
    [B, F] is given, any sample with the same finding labels.

    Args:
        input_ids: [B, T] local texts; all_ids: [B_all, T] the global batch's.
        image_keys: [B] local image keys (`string_keys`); all_image_keys: [B_all].
    """
    bsz = input_ids.shape[0]
    forbidden = same_report(input_ids, all_ids, labels) | image_keys[:, None].eq(all_image_keys[None, :])
    forbidden[torch.arange(bsz, device=input_ids.device), _global_index(bsz, input_ids.device)] = True
    return forbidden


@dataclass
class ItmPairs:
    """The 3B pairs ITM classifies: the positives, (image, hard negative text), (hard negative image, text).

    input_ids, attention_mask: [3B, T]; image_embeds: [3B, 1 + L, Dv]; modality_ids: [3B] or None (a pair's
    modality is its image's); labels: [3B] long, 1 for a matching pair.
    """

    input_ids: Tensor
    attention_mask: Tensor
    image_embeds: Tensor
    modality_ids: Tensor | None
    labels: Tensor


def itm_pairs(image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor, logits: ContrastiveLogits, *,
              sample_ids: Sequence[str] | None, pad_id: int, max_length: int, labels: Tensor | None = None,
              modality_ids: Tensor | None = None) -> ItmPairs:
    """Build the ITM pairs with hard negatives drawn from the whole global batch.

    Args:
        image_embeds: [B, 1 + L, Dv] vision tokens; gathered with gradient, so a trainable vision encoder
            learns from its negative images too.
        input_ids, attention_mask: [B, T] the paired texts.
        logits: the ITC similarities that weight the draw (read without gradient).
        sample_ids: one id per sample (the same id = the same image), or None (all different).
        pad_id, max_length: how to pad the texts to one width before the gather.
        labels: [B, F] finding labels: same-finding samples are never negatives; None: identical texts only.
        modality_ids: [B] or None.
    """
    bsz, device = input_ids.shape[0], input_ids.device
    input_ids = pad_for_gather(input_ids, max_length, pad_id)
    attention_mask = pad_for_gather(attention_mask, max_length, 0)
    all_ids = gather_no_grad(input_ids)
    all_mask = gather_no_grad(attention_mask)
    all_embeds = gather_with_grad(image_embeds)
    image_keys = string_keys(sample_ids or [str(i) for i in range(bsz)], device)
    all_image_keys = gather_no_grad(image_keys)
    forbidden = hard_negative_mask(input_ids, all_ids, image_keys, all_image_keys, labels)
    with torch.no_grad():
        neg_text_idx = sample_hard_negatives(logits.i2t.detach(), forbidden)  # a text for each local image
        neg_image_idx = sample_hard_negatives(logits.t2i.detach(), forbidden)  # an image for each local text
    pair_modalities = None
    if modality_ids is not None:
        all_modality_ids = gather_no_grad(modality_ids)
        pair_modalities = torch.cat([modality_ids, modality_ids, all_modality_ids[neg_image_idx]], dim=0)
    return ItmPairs(
        input_ids=torch.cat([input_ids, all_ids[neg_text_idx], input_ids], dim=0),
        attention_mask=torch.cat([attention_mask, all_mask[neg_text_idx], attention_mask], dim=0),
        image_embeds=torch.cat([image_embeds, image_embeds, all_embeds[neg_image_idx]], dim=0),
        modality_ids=pair_modalities,
        labels=torch.cat([torch.ones(bsz), torch.zeros(2 * bsz)]).long().to(device),
    )


def itm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(cross-entropy [], accuracy [] detached) of the 2-way match logits [3B, 2] against labels [3B]."""
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(1) == labels).float().mean().detach()
    return loss, acc


# ----------------------------------------------------------------------------------------------- ITG


def itg_labels(input_ids: Tensor, attention_mask: Tensor, prefix_lengths: Tensor | None = None) -> Tensor:
    """Next-token targets [B, T-1] of ids [B, T]: position t predicts token t+1; padding and (with
    `prefix_lengths` [B]) a VQA question prefix are IGNORE_INDEX."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    if prefix_lengths is not None:
        positions = torch.arange(1, input_ids.shape[1], device=input_ids.device)[None, :]
        labels = labels.masked_fill(positions < prefix_lengths[:, None], IGNORE_INDEX)
    return labels


def lm_loss(text_states: Tensor, labels: Tensor, lm_head: Callable[[Tensor], Tensor],
            label_smoothing: float = 0.0) -> Tensor:
    """Mean next-token cross-entropy over the scored positions.

    The LM head runs on the scored positions only, so padding and question prefixes cost nothing (with a
    30k vocabulary the head is the largest matrix product of the pass).

    Args:
        text_states: [B, T, H] the causal pass's text outputs.
        labels: [B, T-1] from `itg_labels`.
        lm_head: hidden states [N, H] -> vocabulary logits [N, V].
    """
    scored = labels != IGNORE_INDEX  # [B, T-1]
    logits = lm_head(text_states[:, :-1][scored])  # [N_scored, V]
    return F.cross_entropy(logits.float(), labels[scored], label_smoothing=label_smoothing)


# ----------------------------------------------------------------------------------------------- TIG


def tig_loss(images: Tensor, target_images: Tensor, vq_top: Tensor, vq_bottom: Tensor) -> tuple[Tensor, Tensor]:
    """(MSE(images, targets) + vq_top + vq_bottom, the MSE alone) for reconstructions and targets [B, C, S, S];
    the VQ terms are the quantisers' beta-weighted commitment losses."""
    mse = F.mse_loss(images.float(), target_images.float())
    return mse + vq_top + vq_bottom, mse


def tig_terms(gen: GeneratorOutput, target_images: Tensor,
              std: ChannelStat) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(losses, metrics) of one generator pass for the training output.

    losses: `tig` (with gradient), and detached `tig_mse`, `vq_top`, `vq_bottom`; metrics (detached): codebook
    usage and perplexity per level, and the reconstruction PSNR on the [0, 1] scale (`std`: the inputs'
    normalisation, a scalar or one per channel).
    """
    losses = {"tig": gen.loss, "tig_mse": gen.mse.detach(), "vq_top": gen.vq_top.detach(),
              "vq_bottom": gen.vq_bottom.detach()}
    metrics = {
        "codebook_usage_top": gen.usage_top.detach(),
        "codebook_usage_bottom": gen.usage_bottom.detach(),
        "perplexity_top": gen.perplexity_top.detach(),
        "perplexity_bottom": gen.perplexity_bottom.detach(),
        "psnr": psnr_normalised(gen.images.detach(), target_images, std),
    }
    return losses, metrics
