"""Report generation (ITG) and VQA answers with the image-text encoder in "causal"/"prefix" mode.

Decoding starts from [optional question tokens][bos] and emits tokens until eos or `max_length`:
greedy, beam search and nucleus sampling share one logits pipeline and one scoring rule.

* With `DecodeOptions.use_cache` the first call encodes the image queries, the question and bos once and
  keeps every layer's keys/values (`KVCache`); each step then feeds only the newest token. Without it
  the whole sequence (and the image cross-attention) is recomputed at every step:
  slower, token-identical, kept as the reference.
* Logits processing at every step, in order: bos and pad are never generated; repetition penalty
  (CTRL: a previously generated token's logit is divided by the penalty when positive, multiplied
  when negative); `no_repeat_ngram_size` bans tokens that would repeat an n-gram of the generated
  text; eos is banned until `min_length` tokens exist; sampling divides by `temperature` and keeps
  the top-k / nucleus (top-p) tokens. Question tokens are not counted as generated text.
* Score of a sequence = sum of its tokens' log-probabilities (processed distribution, eos included)
  / length ** length_penalty, for every method, so greedy, beam and sampled scores compare.

Returned tokens exclude bos, include eos when it was produced, and are right-padded with pad_id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from medunifier.model.encoder import ImageTextEncoder
from medunifier.model.masking import KVCache
from medunifier.utils import check_fields


@dataclass(frozen=True)
class DecodeOptions:
    """How `generate` decodes (as transformers' GenerationConfig): checked once, one object for greedy
    decoding, beam search and sampling.

    Args:
        max_length: the most tokens generated (>= 1), eos included.
        min_length: eos is banned until this many tokens exist (>= 0).
        num_beams: beam search when > 1 (not with sampling); 1 decodes greedily or samples.
        do_sample: draw each token instead of taking the most likely one; None samples when top_p is given.
        temperature: > 0; sampling divides the logits by it.
        top_p: sampling keeps the smallest set of tokens whose probability reaches top_p, in (0, 1]; None = 1.
        top_k: sampling keeps the k most likely tokens (>= 0; 0 = all).
        repetition_penalty: CTRL's penalty on the tokens already generated, > 0 (1 = none).
        no_repeat_ngram_size: bans a token that would repeat an n-gram of this size (>= 0; 0 = off).
        length_penalty: a sequence's score is its log-probability / length ** length_penalty.
        use_cache: keep every layer's keys/values and feed only the newest token at each step; False
            recomputes the whole sequence (slower, token-identical, the reference).
    """

    max_length: int = 95
    min_length: int = 0
    num_beams: int = 1
    do_sample: bool | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    use_cache: bool = True

    def __post_init__(self) -> None:
        check_fields(self, (
            ("max_length", self.max_length >= 1, ">= 1"),
            ("min_length", self.min_length >= 0, ">= 0"),
            ("num_beams", self.num_beams >= 1, ">= 1 (1 = greedy or sampling)"),
            ("temperature", self.temperature > 0, "> 0"),
            ("top_p", self.top_p is None or 0.0 < self.top_p <= 1.0, "in (0, 1], or None"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = no top-k filter)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = no penalty)"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, ">= 0 (0 = off)"),
        ))
        if self.sampling and self.num_beams > 1:
            raise ValueError(
                "sampling (do_sample / top_p) works with num_beams=1 only; beam sampling is not supported"
            )

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn: do_sample, or when it is None, whether top_p is given."""
        return self.top_p is not None if self.do_sample is None else self.do_sample


class _Stepper:
    """Next-token logits for a batch of running sequences, with the KV cache or by full recomputation.

    `batch` and `device` come from the image embeddings or else the prefix; a prefix without a mask is
    masked where it is not padding. `banned` are the ids never generated (bos and pad, unless one is eos).
    """

    def __init__(
        self,
        encoder: ImageTextEncoder,
        image_embeds: Tensor | None,
        options: DecodeOptions,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        prefix_ids: Tensor | None,
        prefix_mask: Tensor | None,
        modality_ids: Tensor | None = None,
        continue_prefix: bool = False,
    ):
        if image_embeds is None and prefix_ids is None:
            raise ValueError("generate needs image_embeds and/or prefix_ids")
        ref = image_embeds if image_embeds is not None else prefix_ids
        batch, device = ref.shape[0], ref.device
        self.batch, self.device = batch, device
        if prefix_ids is not None and prefix_mask is None:
            prefix_mask = prefix_ids != pad_id
        self.options, self.eos_id, self.pad_id = options, eos_id, pad_id
        self.banned = tuple({bos_id, pad_id} - {eos_id})
        self.encoder = encoder
        self.image_embeds = image_embeds
        self.modality_ids = modality_ids  # [B]: added to every newly embedded token (and the queries)
        self.use_cache = options.use_cache
        self.mode = "prefix" if prefix_ids is not None else "causal"
        bos = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
        if prefix_ids is not None and continue_prefix:
            # the prefix already ends where decoding starts (e.g. "[DEC] question [SEP]", the VQA training
            # layout); left-padded, so that its last column is a real token in every row
            if not bool(prefix_mask[:, -1].all()):
                raise ValueError("continue_prefix needs left-padded prefix_ids (the last column real in every row)")
            self.prompt, self.prompt_mask = prefix_ids, prefix_mask.long()  # [B, P]
            self.prefix_lengths = torch.full((batch,), prefix_ids.shape[1], dtype=torch.long, device=device)
        elif prefix_ids is not None:
            self.prompt = torch.cat([prefix_ids, bos], dim=1)  # [B, P + 1]
            self.prompt_mask = torch.cat([prefix_mask.long(), torch.ones_like(bos)], dim=1)
            self.prefix_lengths = torch.full((batch,), prefix_ids.shape[1], dtype=torch.long, device=device)
        else:
            self.prompt, self.prompt_mask, self.prefix_lengths = bos, torch.ones_like(bos), None
        self.generated = torch.empty(batch, 0, dtype=torch.long, device=device)  # [B, t]
        self.cache: KVCache | None = None

    def _run(self, input_ids: Tensor, attention_mask: Tensor, **kwargs) -> Tensor:
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mode=self.mode,
            prefix_lengths=self.prefix_lengths,
            modality_ids=self.modality_ids,
            **kwargs,
        )
        if self.use_cache:
            self.cache = out.past_key_values
        return self.encoder.lm_logits(out.text_states[:, -1]).float()  # [B, V]

    def start(self) -> Tensor:
        return self._run(
            self.prompt, self.prompt_mask, image_embeds=self.image_embeds, use_cache=self.use_cache
        )

    def step(self, new_tokens: Tensor) -> Tensor:
        """Append new_tokens [B] and return the logits for the following position."""
        self.append(new_tokens)
        if self.use_cache:
            return self._run(
                new_tokens[:, None],
                torch.ones_like(new_tokens[:, None]),
                past_key_values=self.cache,
                use_cache=True,
            )
        ids = torch.cat([self.prompt, self.generated], dim=1)
        mask = torch.cat([self.prompt_mask, torch.ones_like(self.generated)], dim=1)
        return self._run(ids, mask, image_embeds=self.image_embeds)

    def expand(self, n: int) -> None:
        """Each row becomes n consecutive rows (batch -> beams)."""
        self.prompt = self.prompt.repeat_interleave(n, 0)
        self.prompt_mask = self.prompt_mask.repeat_interleave(n, 0)
        self.generated = self.generated.repeat_interleave(n, 0)
        if self.prefix_lengths is not None:
            self.prefix_lengths = self.prefix_lengths.repeat_interleave(n, 0)
        if self.modality_ids is not None:
            self.modality_ids = self.modality_ids.repeat_interleave(n, 0)
        if self.image_embeds is not None:
            self.image_embeds = self.image_embeds.repeat_interleave(n, 0)
        if self.cache is not None:
            self.cache.repeat_interleave(n)

    def reorder(self, index: Tensor) -> None:
        self.prompt = self.prompt.index_select(0, index)
        self.prompt_mask = self.prompt_mask.index_select(0, index)
        self.generated = self.generated.index_select(0, index)
        if self.prefix_lengths is not None:
            self.prefix_lengths = self.prefix_lengths.index_select(0, index)
        if self.modality_ids is not None:
            self.modality_ids = self.modality_ids.index_select(0, index)
        if self.image_embeds is not None:
            self.image_embeds = self.image_embeds.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    def logprobs(self, logits: Tensor, step: int) -> Tensor:
        """`process_logits` of the next-token logits [N, V] after the tokens generated so far, under the options."""
        o = self.options
        return process_logits(
            logits, self.generated, step, banned_ids=self.banned, eos_id=self.eos_id, min_length=o.min_length,
            repetition_penalty=o.repetition_penalty, no_repeat_ngram_size=o.no_repeat_ngram_size,
        )  # fmt: skip

    def append(self, new_tokens: Tensor) -> None:
        """Append new_tokens [B] to the generated ones (the last step: no logits needed after them)."""
        self.generated = torch.cat([self.generated, new_tokens[:, None]], dim=1)


def process_logits(
    logits: Tensor,
    generated: Tensor,
    step: int,
    *,
    banned_ids: tuple[int, ...],
    eos_id: int,
    min_length: int = 0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> Tensor:
    """[N, V] logits, [N, t] generated tokens -> [N, V] log-probabilities after the rules above."""
    logits = logits.clone()
    logits[:, list(banned_ids)] = -math.inf
    if repetition_penalty != 1.0 and generated.shape[1] > 0:
        seen = logits.gather(1, generated)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits.scatter_(1, generated, seen)
    n = no_repeat_ngram_size
    if n > 0 and generated.shape[1] >= n:
        if n == 1:
            logits.scatter_(1, generated, -math.inf)
        else:
            ngrams = generated.unfold(1, n, 1)  # [N, M, n]
            current = generated[:, -(n - 1) :]  # [N, n-1]
            repeats = (ngrams[:, :, :-1] == current[:, None, :]).all(-1)  # [N, M]
            ban = (
                torch.zeros_like(logits, dtype=torch.long).scatter_add_(1, ngrams[:, :, -1], repeats.long())
                > 0
            )
            logits = logits.masked_fill(ban, -math.inf)
    if step < min_length:
        logits[:, eos_id] = -math.inf
    return F.log_softmax(logits, dim=-1)


def _filter_top_k_top_p(logp: Tensor, top_k: int, top_p: float) -> Tensor:
    """Keep the top_k tokens and the smallest set whose probability reaches top_p; others -> -inf."""
    if top_k > 0:
        kth = logp.topk(min(top_k, logp.shape[-1]), dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, -math.inf)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        cumulative = sorted_logp.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logp.softmax(-1) >= top_p  # mass before this token already >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logp = logp.masked_fill(drop, -math.inf)
    return logp


def _pad_rows(rows: list[Tensor], pad_id: int, device: torch.device) -> Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _greedy_decode(stepper: _Stepper, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Greedy (or, when the options sample, top-k/nucleus sampling) decoding -> (tokens [B, T], scores [B])."""
    o = stepper.options
    batch, device = stepper.batch, stepper.device
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    sum_logp = torch.zeros(batch, device=device)
    lengths = torch.zeros(batch, device=device)
    logits = stepper.start()
    for step in range(o.max_length):
        logp = stepper.logprobs(logits / o.temperature if o.sampling else logits, step)
        if o.sampling:
            probs = _filter_top_k_top_p(logp, o.top_k, 1.0 if o.top_p is None else o.top_p).softmax(-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = logp.argmax(-1)
        token_logp = logp.gather(1, next_tokens[:, None]).squeeze(1)
        sum_logp += torch.where(finished, torch.zeros_like(token_logp), token_logp)
        lengths += (~finished).float()
        next_tokens = next_tokens.masked_fill(finished, stepper.pad_id)
        finished = finished | (next_tokens == stepper.eos_id)
        if bool(finished.all()) or step == o.max_length - 1:
            stepper.append(next_tokens)
            break
        logits = stepper.step(next_tokens)
    scores = sum_logp / lengths.clamp(min=1) ** o.length_penalty
    return stepper.generated, scores


def _beam_search(stepper: _Stepper) -> tuple[Tensor, Tensor]:
    """Beam search -> (best sequence per sample [B, T], its score [B]).

    At each step the 2K best (beam, token) extensions are ranked; an eos among the top K closes a
    hypothesis, the best K others continue. A sample stops when it has K finished hypotheses and no
    running beam can still beat the worst of them (an exact bound, whatever length_penalty is);
    beams still running at max_length are finished there.
    """
    o = stepper.options
    batch, device, k = stepper.batch, stepper.device, o.num_beams
    eos_id, pad_id, max_length, length_penalty = stepper.eos_id, stepper.pad_id, o.max_length, o.length_penalty
    logits = stepper.start().repeat_interleave(k, 0)  # [B*K, V]: the prompt is encoded once per sample
    stepper.expand(k)
    beam_scores = torch.full((batch, k), -math.inf, device=device)
    beam_scores[:, 0] = 0.0  # all beams start identical: extend only the first at step 0
    hyps: list[list[tuple[float, Tensor]]] = [[] for _ in range(batch)]  # (score, tokens) per sample
    done = [False] * batch
    vocab = logits.shape[-1]

    def add_hyp(b: int, score: float, tokens: Tensor) -> None:
        hyps[b].append((score, tokens))
        hyps[b].sort(key=lambda h: h[0], reverse=True)
        del hyps[b][k:]

    for step in range(max_length):
        logp = stepper.logprobs(logits, step)
        candidates = (beam_scores.view(-1, 1) + logp).view(batch, k * vocab)
        top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=1)  # [B, 2K]
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        rows, tokens, scores = [], [], []
        length = step + 1
        for b in range(batch):
            chosen: list[tuple[float, int, int]] = []
            if not done[b]:
                for rank, (score, index) in enumerate(zip(top_scores[b], top_index[b])):
                    beam, token = divmod(index, vocab)
                    if token == eos_id:
                        if rank < k and score > -math.inf:
                            seq = torch.cat(
                                [stepper.generated[b * k + beam], stepper.generated.new_tensor([eos_id])]
                            )
                            add_hyp(b, score / length**length_penalty, seq)
                    else:
                        chosen.append((score, beam, token))
                    if len(chosen) == k:
                        break
            while len(chosen) < k:  # finished sample, or too few candidates: inert placeholder beams
                chosen.append((-math.inf, 0, pad_id))
            best_running = chosen[0][0]
            if not done[b] and best_running == -math.inf:
                done[b] = True  # nothing left to extend
            elif not done[b] and len(hyps[b]) == k:
                final_lengths = (min(length + 1, max_length), max_length)
                bound = max(best_running / n**length_penalty for n in final_lengths)
                done[b] = hyps[b][-1][0] >= bound
            for score, beam, token in chosen:
                rows.append(b * k + beam)
                tokens.append(token)
                scores.append(score)
        index = torch.tensor(rows, device=device)
        next_tokens = torch.tensor(tokens, device=device)
        beam_scores = torch.tensor(scores, device=device).view(batch, k)
        if all(done) or step == max_length - 1:
            stepper.reorder(index)
            stepper.append(next_tokens)
            break
        stepper.reorder(index)
        logits = stepper.step(next_tokens)

    length = stepper.generated.shape[1]
    for b in range(batch):
        if done[b]:
            continue
        for j in range(k):  # running beams end at max_length without eos
            score = float(beam_scores[b, j])
            if score > -math.inf:
                add_hyp(b, score / length**length_penalty, stepper.generated[b * k + j])
    best = [max(h, key=lambda x: x[0]) for h in hyps]
    return _pad_rows([t for _, t in best], pad_id, device), torch.tensor([s for s, _ in best], device=device)


@torch.no_grad()
def generate(
    encoder: ImageTextEncoder,
    image_embeds: Tensor | None,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    options: DecodeOptions = DecodeOptions(),
    *,
    generator: torch.Generator | None = None,
    prefix_ids: Tensor | None = None,
    prefix_mask: Tensor | None = None,
    modality_ids: Tensor | None = None,
    continue_prefix: bool = False,
) -> tuple[Tensor, Tensor]:
    """Decode from image_embeds [B, N, Dv] (and a question prefix_ids [B, P]) -> (tokens [B, T], scores [B]).

    Sampling when the options sample, else beam search when options.num_beams > 1, else greedy. The encoder
    is switched to eval mode for the call and restored.

    Args:
        encoder: the image-text encoder, decoding in "causal" (or, with a prefix, "prefix") mode.
        image_embeds: the image queries' inputs [B, N, Dv], or None for text alone.
        bos_id: the decoder start token ([DEC]), never generated.
        eos_id: the token that ends a sequence ([SEP]).
        pad_id: right-pads the returned tokens; never generated.
        options: lengths, beams, sampling, repetition rules and the cache.
        generator: seeds sampling.
        prefix_ids: question tokens [B, P] encoded first with the "prefix" mask (VQA).
        prefix_mask: prefix_ids' padding is `prefix_mask == 0` (default: prefix_ids != pad_id).
        modality_ids: [B] (0 = unknown) selects the encoder's modality embedding per sample.
        continue_prefix: decoding continues right after prefix_ids, which then must be left-padded and end
            where the answer starts ("[DEC] question [SEP]", the VQA training layout); bos is not appended
            (and still never generated).
    """
    stepper = _Stepper(encoder, image_embeds, options, bos_id, eos_id, pad_id, prefix_ids, prefix_mask,
                       modality_ids, continue_prefix)
    was_training = encoder.training
    encoder.eval()
    try:
        return _beam_search(stepper) if options.num_beams > 1 else _greedy_decode(stepper, generator)
    finally:
        encoder.train(was_training)


__all__ = ["DecodeOptions", "generate", "process_logits"]
