"""MedUnifier: one model that understands and generates medical images (paper section 3).

    image -> VisionEncoder E_I -> f_v = [f_cls, f_local]
    queries + text -> ImageTextEncoder E_Q (cross-attention from queries to f_v)
        ITC  unimodal passes: g_q = H_q(f_q) (Q vectors), g_t = H_t(f_t_cls); sim = max_q cos / tau
        ITM  bidirectional pass on (image, text) pairs plus hard negatives; 2-way head averaged over queries
        ITG  multimodal causal pass; LM head on text positions ([DEC] first)
        TIG  generator(f_q, f_local, f_t_cls) -> VQ codes (top, bottom) -> image; MSE + VQ losses
        I2I  (with i2i.enabled) i2i(source, f_q, f_local, instruction f_t_cls) -> target image or mask
    L = λ1 L_itc + λ2 L_itm + λ3 L_itg + λ4 L_tig (+ λ5 L_i2i on image-to-image batches)

Image-to-image batches (translate / upscale / segment items, drawn by "i2i:" mixture keys) carry the source
as `pixel_values`, the instruction as the text and `i2i_targets` / `i2i_masks`; they train the i2i objective
only (a batch holding such items with another objective switched on is refused).

The objectives' arithmetic (global-batch gathers, hard negatives, targets, cross-entropies) lives in
`model.losses`; `forward` runs the networks and composes those functions. An objective whose weight is zero
is not computed at all (no compute, no gradient).

The model takes tensors: texts and images become them through `medunifier.data.Processor` (the tokenizer,
the question/answer prompt layout, image preprocessing). The model keeps the tokenizer it was built with for
its embedding size and special-token ids, `tokenize` (plain texts) and decoding generated reports.

Task-routed experts (`encoder.experts: task`): ITC, ITM, ITG and the understanding API run the encoder
with role="understand"; TIG's inputs (f_q and the text [CLS]), `reconstruct`, `encode_codes` and the
priors' text features run a second query pass and a second text pass with role="generate", so TIG's
gradient reaches the generation experts and never the understanding ones. With shared experts the
TIG inputs are the ITC passes' outputs, as in the paper.

Modality token (`encoder.modalities`): `batch["modalities"]` (and the API's `modalities=` keyword) are
mapped to ids (`modality_ids`, unknown -> 0) and reach every encoder pass of the sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medunifier.config import I2I_TASKS, LossWeights, MedUnifierConfig
from medunifier.model.decoding import DecodeOptions, generate
from medunifier.model.encoder import ImageTextEncoder
from medunifier.model.generator import TextGroundedGenerator
from medunifier.model.i2i import ImageToImageHead, i2i_loss
from medunifier.model.losses import (
    contrastive_logits,
    itc_loss,
    itc_similarity,
    itc_soft_targets,
    itc_teacher_targets,
    itg_labels,
    itm_loss,
    itm_pairs,
    lm_loss,
    mix_itc_targets,
    tig_terms,
)
from medunifier.model.parameters import parameter_counts, parameter_report
from medunifier.model.report_selection import pick_by_matching
from medunifier.model.saving import load_pretrained, save_pretrained
from medunifier.model.vision import VisionEncoder
from medunifier.tokens import load_tokenizer, special_ids

__all__ = ["MedUnifier", "MedUnifierOutput"]


@dataclass
class MedUnifierOutput:
    """What one forward pass gives the training loop.

    loss: the weighted total, [] (with grad).
    losses: each objective's loss, [] tensors (`tig_mse`, `vq_top`, `vq_bottom` detached).
    metrics: training diagnostics (`itc_acc`, `itm_acc`, `temperature`, codebook usage, `psnr`, ...), detached
        [] tensors on the model's device, so reading them is the caller's choice of when to wait for the
        device; `itc_global_batch` is a Python float (a shape).
    """

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class MedUnifier(nn.Module):
    """The full model. `model(batch)` returns every loss; the other methods are the public API."""

    def __init__(self, config: MedUnifierConfig, tokenizer: Any | None = None, load_pretrained: bool = True):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.text.tokenizer)
        self.special = special_ids(self.tokenizer)
        enc = config.encoder
        self.vision = VisionEncoder(config.vision, config.image)
        self.encoder = ImageTextEncoder(
            enc, vocab_size=len(self.tokenizer), vision_width=self.vision.hidden_size, pad_token_id=self.special["pad"]
        )
        if load_pretrained and enc.pretrained:
            from medunifier.model.checkpoint_loading import load_encoder_weights

            self.bert_load_report = load_encoder_weights(self.encoder, enc, self.tokenizer)
        self.image_proj = nn.Linear(enc.hidden_size, enc.embed_dim)  # H_q
        self.text_proj = nn.Linear(enc.hidden_size, enc.embed_dim)  # H_t
        self.itm_head = nn.Linear(enc.hidden_size, 2)
        self.temperature = nn.Parameter(torch.tensor(float(config.itc_temperature)))
        self.generator = TextGroundedGenerator(
            config.generator,
            config.image,
            query_width=enc.hidden_size,
            num_queries=enc.num_queries,
            vision_width=self.vision.hidden_size,
            num_patches=self.vision.num_patches,
            text_width=enc.hidden_size,
        )
        self.i2i = ImageToImageHead(
            config.i2i, config.image, query_width=enc.hidden_size, vision_width=self.vision.hidden_size,
            num_patches=self.vision.num_patches, text_width=enc.hidden_size,
        ) if config.i2i.enabled else None

    # ------------------------------------------------------------------ parameters and training set-up

    MODULE_PREFIXES = ("vision", "encoder", "image_proj", "text_proj", "itm_head", "temperature", "generator", "i2i")

    def set_trainable(self, prefixes: list[str] | None) -> None:
        """Train only parameters whose name starts with one of `prefixes` (None: the config's default).

        The vision encoder stays frozen when `vision.frozen` is set, whatever the prefixes say. A vision
        encoder left with nothing to train is also kept in eval mode (see `train`).
        """
        for name, param in self.named_parameters():
            allowed = prefixes is None or any(name.startswith(p) for p in prefixes)
            if name.startswith("vision.") and self.config.vision.frozen:
                allowed = False
            param.requires_grad_(allowed)
        self.train(self.training)

    def train(self, mode: bool = True) -> MedUnifier:
        """nn.Module.train, except that a vision encoder with no trainable parameter stays in eval mode,
        so that a curriculum stage that does not train it leaves its BatchNorm statistics alone too."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.vision.parameters()):
            self.vision.eval()
        return self

    # ------------------------------------------------------------------------------ building blocks

    def _task_ids(self, input_ids: Tensor, token: str) -> Tensor:
        ids = input_ids.clone()
        ids[:, 0] = self.special[token]
        return ids

    def image_features(self, pixel_values: Tensor, cache_keys: list[str] | None = None) -> Tensor:
        """f_v = [f_cls, f_local]: [B, 1 + L, Dv]; `cache_keys` reach a configured feature cache."""
        if cache_keys is not None and self.uses_feature_cache:
            return self.vision(pixel_values, cache_keys=cache_keys)
        return self.vision(pixel_values)

    @property
    def uses_feature_cache(self) -> bool:
        """Whether the config keeps the frozen backbone's features (in memory or on disk)."""
        return bool(self.config.vision.cache_features or self.config.vision.feature_cache)

    @staticmethod
    def cache_keys(batch: dict[str, Any]) -> list[str] | None:
        """A batch's feature-cache keys: record id and image hash when the data carries them, else the ids."""
        return batch.get("cache_keys") or batch.get("ids")

    def query_states(
        self, image_embeds: Tensor, role: str = "understand", modality_ids: Tensor | None = None
    ) -> Tensor:
        """f_q: query outputs of the unimodal (query-only) pass, [B, Q, H]."""
        return self.encoder(
            image_embeds=image_embeds, mode="query", role=role, modality_ids=modality_ids
        ).query_states

    def text_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        role: str = "understand",
        modality_ids: Tensor | None = None,
    ) -> Tensor:
        """Text-only pass with the [CLS] first token, [B, T, H]."""
        return self.encoder(
            input_ids=self._task_ids(input_ids, "cls"),
            attention_mask=attention_mask,
            mode="text",
            role=role,
            modality_ids=modality_ids,
        ).text_states

    def modality_ids(self, modalities: list[str]) -> Tensor:
        """Modality names -> ids [B] for the encoder: 1 + index in `encoder.modalities`, unknown -> 0.

        Names compare case-insensitively, ignoring surrounding spaces. All zeros when the feature is off.
        """
        known = {m.strip().lower(): i + 1 for i, m in enumerate(self.config.encoder.modalities)}
        ids = [known.get(str(m).strip().lower(), 0) for m in modalities]
        return torch.tensor(ids, dtype=torch.long, device=self.temperature.device)

    def modality_ids_for(self, modalities: Sequence[str] | None, batch: int) -> Tensor | None:
        """ids [B] for the encoder, or None (the encoder reads it as unknown) when off or not given.

        Args:
            modalities: one name per sample, or None.
            batch: the batch size the names must match.
        """
        if not self.config.encoder.modalities or modalities is None:
            return None
        if len(modalities) != batch:
            raise ValueError(f"{len(modalities)} modalities for a batch of {batch}")
        return self.modality_ids(list(modalities))

    # --------------------------------------------------------------------------------------- forward

    def forward(self, batch: dict[str, Any], loss_weights: LossWeights | None = None) -> MedUnifierOutput:
        weights = loss_weights or self.config.losses
        pixel_values: Tensor = batch["pixel_values"]
        input_ids: Tensor = batch["input_ids"]
        attention_mask: Tensor = batch["attention_mask"]
        device = pixel_values.device
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor | float] = {}  # detached device tensors: no host sync here
        total = pixel_values.new_zeros(())

        task_experts = self.config.encoder.experts == "task"
        i2i_items = [t in I2I_TASKS for t in batch.get("tasks") or []]
        if any(i2i_items):
            others = [n for n in ("itc", "itm", "itg", "tig") if getattr(weights, n) > 0]
            if others or not all(i2i_items):
                raise ValueError(f"a batch with image-to-image items trains the i2i objective alone (got {others} on "
                                 "and other items too): draw them with 'i2i:' mixture keys")
            if weights.i2i > 0 and self.i2i is None:
                raise ValueError("losses.i2i > 0 needs the image-to-image head: set i2i.enabled=true")
        need_unimodal = weights.itc > 0 or weights.itm > 0 or (weights.tig > 0 and not task_experts)
        image_embeds = self.image_features(pixel_values, self.cache_keys(batch))  # [B, 1+L, Dv]
        modality_ids = self.modality_ids_for(batch.get("modalities"), pixel_values.shape[0])  # [B] or None
        query_out = text_out = None
        if need_unimodal:
            query_out = self.query_states(image_embeds, modality_ids=modality_ids)  # f_q [B, Q, H]
            text_out = self.text_states(input_ids, attention_mask, modality_ids=modality_ids)  # f_t [B, T, H]

        text = self.config.text
        itc_logits = None
        if weights.itc > 0 or weights.itm > 0:
            image_feats = F.normalize(self.image_proj(query_out), dim=-1)  # g_q [B, Q, E]
            text_feats = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)  # g_t [B, E]
            with torch.no_grad():
                self.temperature.clamp_(0.001, 0.5)
            itc_logits = contrastive_logits(image_feats, text_feats, self.temperature)  # [B, B_all] each way
            metrics["itc_global_batch"] = float(itc_logits.global_batch)
            metrics["temperature"] = self.temperature.detach().clone()
            if weights.itc > 0:
                target = None  # the paired sample, or probabilities over same-finding pairs
                if self.config.itc_targets == "findings":
                    target = itc_soft_targets(input_ids, batch.get("labels"), itc_logits.targets,
                                              pad_id=self.special["pad"], max_length=text.max_length)
                if self.config.itc_distill > 0 and "itc_teacher" in batch:  # set by the trainer (train.teacher)
                    teacher = itc_teacher_targets(*batch["itc_teacher"])  # ([B, B_all], [B, B_all])
                    target = mix_itc_targets(target, itc_logits, teacher, self.config.itc_distill)
                    metrics["itc_distilled"] = 1.0
                loss_itc, metrics["itc_acc"] = itc_loss(itc_logits, target, self.config.label_smoothing)
                losses["itc"] = loss_itc
                total = total + weights.itc * loss_itc

        if weights.itm > 0:
            pairs = itm_pairs(
                image_embeds, input_ids, attention_mask, itc_logits, sample_ids=batch.get("ids"),
                pad_id=self.special["pad"], max_length=text.max_length, modality_ids=modality_ids,
                labels=batch.get("labels") if self.config.itm_negatives == "findings" else None,
            )
            out = self.encoder(
                input_ids=self._task_ids(pairs.input_ids, "enc"),
                attention_mask=pairs.attention_mask,
                image_embeds=pairs.image_embeds,
                mode="bidirectional",
                modality_ids=pairs.modality_ids,
                queries_only=True,
            )
            loss_itm, metrics["itm_acc"] = itm_loss(self.itm_head(out.query_states).mean(dim=1), pairs.labels)
            losses["itm"] = loss_itm
            total = total + weights.itm * loss_itm

        if weights.itg > 0:
            loss_itg = self._itg_loss(
                image_embeds, input_ids, attention_mask, batch.get("prefix_lengths"), modality_ids
            )
            losses["itg"] = loss_itg
            total = total + weights.itg * loss_itg

        if weights.tig > 0:
            if task_experts:  # the generation path has its own experts: a second query pass and text pass
                gen_query = self.query_states(image_embeds, role="generate", modality_ids=modality_ids)
                gen_text = self.text_states(input_ids, attention_mask, role="generate", modality_ids=modality_ids)
            else:
                gen_query, gen_text = query_out, text_out
            gen = self.generator(gen_query, image_embeds[:, 1:], gen_text[:, 0], target_images=pixel_values,
                                 pixel_values=pixel_values)
            tig_losses, tig_metrics = tig_terms(gen, pixel_values, self.config.image.std)
            losses.update(tig_losses)
            metrics.update(tig_metrics)
            total = total + weights.tig * gen.loss
        if weights.i2i > 0 and any(i2i_items):
            images, mask_logits = self.i2i(
                pixel_values,
                self.query_states(image_embeds, role="generate", modality_ids=modality_ids),
                image_embeds[:, 1:],
                self.text_states(input_ids, attention_mask, role="generate", modality_ids=modality_ids)[:, 0],
            )
            is_mask = torch.tensor([t == "segment" for t in batch["tasks"]], device=device)
            loss_i2i, parts = i2i_loss(images, mask_logits, batch["i2i_targets"], batch["i2i_masks"], is_mask,
                                       image_loss=self.config.i2i.image_loss,
                                       mask_pos_weight=self.config.i2i.mask_pos_weight)
            losses["i2i"] = loss_i2i
            losses.update(parts)
            total = total + weights.i2i * loss_i2i
        return MedUnifierOutput(loss=total, losses=losses, metrics=metrics)

    def _itg_loss(
        self,
        image_embeds: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor,
        prefix_lengths: Tensor | None,
        modality_ids: Tensor | None = None,
    ) -> Tensor:
        """Causal LM on the text given the queries; padding (and a VQA question prefix) is not scored."""
        ids = self._task_ids(input_ids, "dec")
        has_prefix = prefix_lengths is not None and bool((prefix_lengths > 0).any())
        out = self.encoder(
            input_ids=ids,
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            mode="prefix" if has_prefix else "causal",
            prefix_lengths=prefix_lengths if has_prefix else None,
            modality_ids=modality_ids,
        )
        labels = itg_labels(ids, attention_mask, prefix_lengths if has_prefix else None)
        return lm_loss(out.text_states, labels, self.encoder.lm_logits, self.config.label_smoothing)

    # ----------------------------------------------------------------------------------- public API

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length or self.config.text.max_length,
            return_tensors="pt",
        )
        device = self.temperature.device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    @torch.no_grad()
    def encode_image(self, pixel_values: Tensor | None, *, image_embeds: Tensor | None = None,
                     modalities: list[str] | None = None) -> Tensor:
        """Normalised ITC image embeddings, one per query: [B, Q, E].

        Args:
            pixel_values: [B, C, S, S], or None with `image_embeds`.
            image_embeds: the vision tokens [B, N, D] (`image_features`) in place of the pixels.
            modalities: one per image (None: unknown).
        """
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("encode_image takes pixel_values or image_embeds, exactly one")
        if image_embeds is None:
            image_embeds = self.image_features(pixel_values)
        modality_ids = self.modality_ids_for(modalities, image_embeds.shape[0])
        f_q = self.query_states(image_embeds, modality_ids=modality_ids)
        return F.normalize(self.image_proj(f_q), dim=-1)

    @torch.no_grad()
    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor, *, modalities: list[str] | None = None
    ) -> Tensor:
        """Normalised ITC text embeddings: [B, E]. modalities: one per text (None: unknown)."""
        modality_ids = self.modality_ids_for(modalities, input_ids.shape[0])
        f_t = self.text_states(input_ids, attention_mask, modality_ids=modality_ids)
        return F.normalize(self.text_proj(f_t[:, 0]), dim=-1)

    @torch.no_grad()
    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """Cosine similarity (max over queries) between [Bi, Q, E] and [Bt, E]: [Bi, Bt]."""
        return itc_similarity(image_embeds, text_embeds, 1.0)[0]

    @torch.no_grad()
    def itm_logits(
        self,
        pixel_values: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        image_embeds: Tensor | None = None,
        modalities: list[str] | None = None,
    ) -> Tensor:
        """ITM head logits of each (image, text) pair, [B, 2] = (no match, match).

        Args:
            pixel_values: [B, C, S, S], or None with `image_embeds`.
            input_ids, attention_mask: the texts [B, L].
            image_embeds: the vision tokens [B, N, D] (`image_features`) in place of the pixels, so that one image
                can be scored against many texts without running the vision tower again.
            modalities: one per pair (None: unknown).
        """
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError("the ITM scores take pixel_values or image_embeds, exactly one")
        if image_embeds is None:
            image_embeds = self.image_features(pixel_values)
        out = self.encoder(
            input_ids=self._task_ids(input_ids, "enc"),
            attention_mask=attention_mask,
            image_embeds=image_embeds,
            mode="bidirectional",
            modality_ids=self.modality_ids_for(modalities, image_embeds.shape[0]),
            queries_only=True,
        )
        return self.itm_head(out.query_states).mean(dim=1)

    @torch.no_grad()
    def itm_score(self, pixel_values: Tensor | None, input_ids: Tensor, attention_mask: Tensor, *,
                  image_embeds: Tensor | None = None, modalities: list[str] | None = None) -> Tensor:
        """Probability that each (image, text) pair matches: [B]; arguments as `itm_logits`."""
        logits = self.itm_logits(pixel_values, input_ids, attention_mask, image_embeds=image_embeds,
                                 modalities=modalities)
        return logits.softmax(-1)[:, 1]

    @torch.no_grad()
    def generate_report(
        self,
        pixel_values: Tensor,
        num_beams: int = 3,
        max_length: int | None = None,
        min_length: int = 0,
        top_p: float | None = None,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        length_penalty: float = 1.0,
        generator: torch.Generator | None = None,
        prefix_ids: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        *,
        modalities: list[str] | None = None,
        candidates: int = 1,
        candidate_top_p: float = 0.9,
    ) -> list[str]:
        """Draft reports for a batch of images, or answers after question prefixes.

        prefix_ids, prefix_mask: [B, P] left-padded "[DEC] question [SEP]" (`Processor.question_prefixes`);
        decoding continues after them and the answer alone is returned.
        candidates: N > 1 drafts N reports per image (the one decoded as asked and N - 1 nucleus samples at
        `candidate_top_p`, drawn from `generator`) and keeps the one the model's own ITM, ITC and decoder
        likelihood score highest (`report_selection.pick_by_matching`). Reports only.
        """
        if candidates < 1 or (candidates > 1 and prefix_ids is not None):
            raise ValueError(f"candidates must be >= 1, and 1 with question prefixes (got {candidates})")
        image_embeds = self.image_features(pixel_values)
        max_length = max_length or self.config.text.max_length
        if prefix_ids is not None:
            if prefix_mask is None:
                raise ValueError("prefix_ids needs its prefix_mask (Processor.question_prefixes gives both)")
            prefix_ids, prefix_mask = prefix_ids.to(pixel_values.device), prefix_mask.to(pixel_values.device)
            room = self.config.encoder.max_position_embeddings - prefix_ids.shape[1]
            max_length = max(1, min(max_length, room))
        options = DecodeOptions(
            max_length=max_length,
            min_length=min_length,
            num_beams=1 if top_p is not None else num_beams,  # nucleus sampling draws one sequence per image
            top_p=top_p,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            length_penalty=length_penalty,
        )
        modality_ids = self.modality_ids_for(modalities, pixel_values.shape[0])

        def decode(opts: DecodeOptions) -> list[str]:
            tokens, _ = generate(self.encoder, image_embeds, bos_id=self.special["dec"], eos_id=self.special["sep"],
                                 pad_id=self.special["pad"], options=opts, generator=generator, prefix_ids=prefix_ids,
                                 prefix_mask=prefix_mask, continue_prefix=prefix_ids is not None,
                                 modality_ids=modality_ids)
            return self.tokenizer.batch_decode(tokens, skip_special_tokens=True)

        drafts = [decode(options)]
        if candidates > 1:
            sampled = replace(options, num_beams=1, top_p=candidate_top_p)
            drafts += [decode(sampled) for _ in range(candidates - 1)]
            return pick_by_matching(self, image_embeds, drafts, modalities)
        return drafts[0]

    def _generator_inputs(
        self,
        pixel_values: Tensor,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        modalities: list[str] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(f_q [B, Q, H], f_local [B, L, Dv], text CLS [B, H]) from the generation-role passes."""
        image_embeds = self.image_features(pixel_values)
        modality_ids = self.modality_ids_for(modalities, pixel_values.shape[0])
        if input_ids is None:
            input_ids = torch.full((pixel_values.shape[0], 2), self.special["pad"], device=pixel_values.device)
            input_ids[:, 0], input_ids[:, 1] = self.special["cls"], self.special["sep"]
            attention_mask = torch.ones_like(input_ids)
        text_cls = self.text_states(input_ids, attention_mask, role="generate", modality_ids=modality_ids)[:, 0]
        f_q = self.query_states(image_embeds, role="generate", modality_ids=modality_ids)
        return f_q, image_embeds[:, 1:], text_cls

    @torch.no_grad()
    def reconstruct(
        self,
        pixel_values: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        modalities: list[str] | None = None,
    ) -> Tensor:
        """Image -> codes -> image, grounded on the given text (an empty report when None)."""
        inputs = self._generator_inputs(pixel_values, input_ids, attention_mask, modalities)
        out = self.generator(*inputs, pixel_values=pixel_values)
        return out.images

    @torch.no_grad()
    def encode_codes(
        self,
        pixel_values: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        modalities: list[str] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(top [B, t, t], bottom [B, b, b]) code indices."""
        return self.generator.encode_codes(
            *self._generator_inputs(pixel_values, input_ids, attention_mask, modalities), pixel_values
        )

    @torch.no_grad()
    def decode_codes(self, codes_top: Tensor, codes_bottom: Tensor) -> Tensor:
        return self.generator.decode_codes(codes_top, codes_bottom)

    @torch.no_grad()
    def image_to_image(
        self, pixel_values: Tensor, instructions: list[str], *, modalities: list[str] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(images [B, C, S, S], normalised like the inputs; mask probabilities [B, 1, S, S]) for source images
        (a low-resolution source resized to the model's size) and one instruction each ("upscale x4",
        "translate to a bone-suppressed image", "outline the heart"). Read the images for translate / upscale
        and the mask for segment."""
        if self.i2i is None:
            raise ValueError("this model has no image-to-image head (trained without i2i.enabled)")
        if len(instructions) != pixel_values.shape[0]:
            raise ValueError(f"{len(instructions)} instructions for {pixel_values.shape[0]} images")
        tokens = self.tokenize(instructions)
        image_embeds = self.image_features(pixel_values)
        modality_ids = self.modality_ids_for(modalities, pixel_values.shape[0])
        f_q = self.query_states(image_embeds, role="generate", modality_ids=modality_ids)
        text_cls = self.text_states(tokens["input_ids"], tokens["attention_mask"], role="generate",
                                    modality_ids=modality_ids)[:, 0]
        images, mask_logits = self.i2i(pixel_values, f_q, image_embeds[:, 1:], text_cls)
        return images, mask_logits.sigmoid()

    # ------------------------------------------------------------------------------- save and load

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """{module: {"total", "trainable"}} (`model.parameters.parameter_counts`)."""
        return parameter_counts(self)

    def parameter_report(self) -> dict[str, int]:
        """Parameter counts by module and the expert cost (`model.parameters.parameter_report`)."""
        return parameter_report(self)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """safetensors weights + JSON config + tokenizer files in `out_dir` (see `model.saving`); never pickle."""
        return save_pretrained(self, out_dir)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, map_location: str | torch.device = "cpu") -> MedUnifier:
        """The model saved in `model_dir` (or a run folder holding it as `model/`), on `map_location`."""
        return load_pretrained(cls, model_dir, map_location)
