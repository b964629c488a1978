"""Pieces shared by the two code priors (masked and autoregressive).

Both priors model a map of VQ codes `[B, h, w]` (flattened in raster order to `[B, L]`, L = h*w) with a
small pre-LN transformer. Every block has self-attention over the code tokens, cross-attention to the
report text (the image-text encoder's text-only features `[B, T, H]`, with a key padding mask) and an MLP.
The bottom level is also conditioned on the top codes: they are embedded, upsampled (nearest) to the
bottom resolution and *added* to the bottom token embeddings, so bottom position i sees the top code
covering it.

Classifier-free guidance: during training the text of a sample is replaced, with probability
`cond_dropout`, by a single learned null token (all other text positions masked). At sampling time
`logits = uncond + g * (cond - uncond)`, with both halves computed in one batched forward of 2B rows.
`g == 0` runs only the unconditional half (exactly the sampling with no text) and `g == 1` only the
conditional half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class PriorConfig:
    """Sizes of a hierarchical code prior (one transformer per level, both built from this)."""

    kind: Literal["masked", "autoregressive"]
    codebook_size: int  # V: codes are in [0, V)
    top_size: int  # side of the top code map (8 in the paper)
    bottom_size: int  # side of the bottom code map (16 in the paper)
    text_width: int  # H: hidden size of the image-text encoder's text features
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    cond_dropout: float = 0.1  # P(text replaced by the null token) in training: classifier-free guidance
    steps: int = 8  # masked prior: default number of parallel-decoding steps per level

    def __post_init__(self) -> None:
        if self.kind not in ("masked", "autoregressive"):
            raise ValueError(f"PriorConfig.kind must be 'masked' or 'autoregressive', got {self.kind!r}")
        if self.width % self.heads:
            raise ValueError(f"PriorConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"PriorConfig.cond_dropout must be in [0, 1), got {self.cond_dropout}")


# ----------------------------------------------------------------------------------------------------------
# Masking schedule (MaskGIT)


def cosine_schedule(r: Tensor | float) -> Tensor:
    """gamma(r) = cos(pi/2 * r): fraction of tokens still masked at progress r in [0, 1]; gamma(0)=1, gamma(1)=0."""
    r = torch.as_tensor(r, dtype=torch.float64)
    return torch.cos(0.5 * math.pi * r.clamp(0.0, 1.0))


def masked_count_schedule(num_masked: Tensor, steps: int) -> Tensor:
    """Number of tokens still masked after each of `steps` decoding steps.

    num_masked: LongTensor[B] (tokens to generate per sample). Returns LongTensor[B, steps] with
    entry s = floor(n * gamma((s+1)/steps)), forced to drop by at least one per step while any token is
    masked (so no step is wasted) and to reach 0 at the last step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = num_masked.long()
    still = n.clone()
    counts = []
    for s in range(steps):
        target = torch.floor(n.double() * cosine_schedule((s + 1) / steps)).long()
        still = torch.minimum(target, (still - 1).clamp(min=0))
        counts.append(still)
    counts[-1] = torch.zeros_like(n)
    return torch.stack(counts, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Sampling helpers


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf the logits outside the top-k and/or the nucleus of mass top_p (last dimension)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the smallest prefix reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def gumbel_noise(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Standard Gumbel noise drawn from `generator` (a fixed number of draws per call, whatever the logits)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def sample_tokens(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one token per row of logits [..., V] by the Gumbel-max trick; returns (tokens, their log-prob).

    temperature <= 0 means greedy (argmax, no random draw).
    """
    logits = logits.float()
    if temperature <= 0:
        logits = filter_logits(logits, top_k, top_p)
        tokens = logits.argmax(-1)
    else:
        logits = filter_logits(logits / temperature, top_k, top_p)
        tokens = (logits + gumbel_noise(logits.shape, generator, logits.device)).argmax(-1)
    log_probs = logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, log_probs



# ----------------------------------------------------------------------------------------------------------
# Text conditioning and classifier-free guidance


class TextConditioner(nn.Module):
    """Holds the learned null text token and applies condition dropout.

    The null token lives in the encoder's text space [H]; it is projected like any text token.
    """

    def __init__(self, text_width: int) -> None:
        super().__init__()
        self.null_token = nn.Parameter(torch.randn(text_width) * 0.02)

    def null_text(self, batch: int, length: int = 1) -> tuple[Tensor, Tensor]:
        """Null conditioning: the null token at position 0, zeros elsewhere, mask True only at 0.

        Returns (states [batch, length, H], mask bool [batch, length]).
        """
        states = self.null_token.new_zeros(batch, length, self.null_token.shape[0])
        states[:, 0] = self.null_token
        mask = torch.zeros(batch, length, dtype=torch.bool, device=states.device)
        mask[:, 0] = True
        return states, mask

    def drop(self, text_states: Tensor, text_mask: Tensor, p: float) -> tuple[Tensor, Tensor]:
        """Replace each sample's text by the null text with probability p (training only)."""
        text_mask = text_mask.bool()
        if p <= 0:
            return text_states, text_mask
        batch, length, _ = text_states.shape
        dropped = torch.rand(batch, device=text_states.device) < p  # [B]
        null_states, null_mask = self.null_text(batch, length)
        states = torch.where(dropped[:, None, None], null_states.to(text_states.dtype), text_states)
        mask = torch.where(dropped[:, None], null_mask, text_mask)
        return states, mask


@dataclass
class Conditioning:
    """Text rows fed to the network at sampling time and how to merge the resulting logits.

    mode "cond": B rows of text; "uncond": B rows of null text; "guided": 2B rows (text, then null).
    """

    states: Tensor  # [B or 2B, T, H]
    mask: Tensor  # bool [B or 2B, T]
    mode: Literal["cond", "uncond", "guided"]
    guidance: float

    @property
    def repeats(self) -> int:
        return 2 if self.mode == "guided" else 1

    def rows(self, x: Tensor | None) -> Tensor | None:
        """A per-sample tensor [B, ...] for the network's rows: [2B, ...] (twice over) when guided; None stays None.

        Args:
            x: e.g. the context-code embeddings [B, L, W].
        """
        return torch.cat([x, x], dim=0) if x is not None and self.repeats == 2 else x

    def merge(self, logits: Tensor) -> Tensor:
        """[repeats*B, ..., V] -> [B, ..., V] with logits = uncond + g * (cond - uncond) when guided."""
        if self.mode != "guided":
            return logits
        cond, uncond = logits.float().chunk(2, dim=0)
        return uncond + self.guidance * (cond - uncond)


def make_conditioning(
    conditioner: TextConditioner,
    text_states: Tensor | None,
    text_mask: Tensor | None,
    guidance: float,
    batch: int,
) -> Conditioning:
    """Build the sampling-time text rows: unconditional if no text or guidance 0, batched 2B if guided."""
    if text_states is None or guidance == 0.0:
        states, mask = conditioner.null_text(batch)
        return Conditioning(states, mask, "uncond", guidance)
    if text_states.shape[0] != batch:
        raise ValueError(f"text_states has batch {text_states.shape[0]}, expected {batch}")
    mask = (
        torch.ones(text_states.shape[:2], dtype=torch.bool, device=text_states.device)
        if text_mask is None
        else text_mask.bool()
    )
    if guidance == 1.0:
        return Conditioning(text_states, mask, "cond", guidance)
    null_states, null_mask = conditioner.null_text(batch, text_states.shape[1])
    states = torch.cat([text_states, null_states.to(text_states.dtype)], dim=0)
    return Conditioning(states, torch.cat([mask, null_mask], dim=0), "guided", guidance)


# ----------------------------------------------------------------------------------------------------------
# Transformer


class KVCache:
    """Per-layer self-attention keys/values [B, heads, max_len, head_dim], preallocated and filled position by
    position; max_len is the sequence length of the prior."""

    def __init__(self, num_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers

    def write(self, layer: int, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Store k, v [B, nh, N, hd] at positions start..start+N-1; return all keys/values up to there."""
        if self.keys[layer] is None:
            batch, heads, _, head_dim = k.shape
            self.keys[layer] = k.new_empty(batch, heads, self.max_len, head_dim)
            self.values[layer] = v.new_empty(batch, heads, self.max_len, head_dim)
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self,
        x: Tensor,
        causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> Tensor:
        # x: [B, N, W]
        batch, n, width = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        is_causal = causal
        if cache is not None:
            k, v = cache.write(layer, k, v, start)  # [B, nh, start+N, hd]
            if start > 0:
                if n != 1:
                    raise ValueError("the KV cache only extends one position at a time after the prefill")
                is_causal = False  # a single new query may attend to every cached key
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # [B, nh, N, hd]
        return self.out(y.transpose(1, 2).reshape(batch, n, width))


class CrossAttention(nn.Module):
    """Queries from the code tokens, keys/values from the projected text (computed once per sampling call)."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def text_kv(self, text: Tensor) -> tuple[Tensor, Tensor]:
        # text: [B, T, W] -> k, v: [B, nh, T, hd]
        batch, length, width = text.shape
        k, v = self.kv(text).view(batch, length, 2, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], text_mask: Tensor) -> Tensor:
        batch, n, width = x.shape
        q = self.q(x).view(batch, n, self.heads, width // self.heads).transpose(1, 2)  # [B, nh, N, hd]
        y = F.scaled_dot_product_attention(
            q,
            kv[0],
            kv[1],
            attn_mask=text_mask[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(batch, n, width))


class PriorBlock(nn.Module):
    """Pre-LN block: self-attention, cross-attention to the text, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = SelfAttention(width, heads, dropout)
        self.cross_attn = CrossAttention(width, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width),
            nn.Dropout(dropout),
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        text_kv: tuple[Tensor, Tensor],
        text_mask: Tensor,
        causal: bool,
        cache: KVCache | None = None,
        layer: int = 0,
        start: int = 0,
    ) -> Tensor:
        x = x + self.drop(self.self_attn(self.norm1(x), causal, cache, layer, start))
        x = x + self.drop(self.cross_attn(self.norm2(x), text_kv, text_mask))
        return x + self.mlp(self.norm3(x))


class PriorTransformer(nn.Module):
    """Token + position (+ upsampled context-code) embeddings, text projection, blocks, head over V codes.

    vocab: input vocabulary (V codes plus one special token: [MASK] or [BOS], id V).
    """

    def __init__(self, config: PriorConfig, side: int, context_side: int | None) -> None:
        super().__init__()
        w = config.width
        self.side, self.context_side, self.seq_len = side, context_side, side * side
        self.token_embed = nn.Embedding(config.codebook_size + 1, w)
        self.pos_embed = nn.Parameter(torch.zeros(self.seq_len, w))
        self.context_embed = nn.Embedding(config.codebook_size, w) if context_side is not None else None
        self.text_proj = nn.Sequential(nn.LayerNorm(config.text_width), nn.Linear(config.text_width, w))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            PriorBlock(w, config.heads, config.mlp_ratio, config.dropout) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, config.codebook_size)
        self.apply(_init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    def context(self, context_codes: Tensor | None) -> Tensor | None:
        """Top codes [B, hc, wc] -> embeddings upsampled (nearest) to this level, flattened: [B, L, W]."""
        if self.context_embed is None:
            return None
        if context_codes is None:
            raise ValueError("this prior is conditioned on context codes (the top map): pass context_codes")
        emb = self.context_embed(context_codes).permute(0, 3, 1, 2)  # [B, W, hc, wc]
        emb = F.interpolate(emb, size=(self.side, self.side), mode="nearest")  # [B, W, h, w]
        return emb.flatten(2).transpose(1, 2)

    def text_kv(self, text_states: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-layer cross-attention keys/values for the text [B, T, H]."""
        text = self.text_proj(text_states)  # [B, T, W]
        return [block.cross_attn.text_kv(text) for block in self.blocks]

    def forward(
        self,
        tokens: Tensor,
        text_kv: list[tuple[Tensor, Tensor]],
        text_mask: Tensor,
        context: Tensor | None,
        causal: bool,
        start: int = 0,
        cache: KVCache | None = None,
    ) -> Tensor:
        """tokens [B, N] at positions start..start+N-1 -> logits [B, N, V]."""
        n = tokens.shape[1]
        x = self.token_embed(tokens) + self.pos_embed[start : start + n]
        if context is not None:
            x = x + context[:, start : start + n]
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, text_kv[layer], text_mask, causal, cache, layer, start)
        return self.head(self.norm(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def resize_mask(mask: Tensor, side: int) -> Tensor:
    """Bool mask [B, h, w] -> [B, side, side]: a cell is True if any covered input cell is (max-pool / nearest)."""
    m = mask.float()[:, None]
    if mask.shape[-1] >= side:
        m = F.adaptive_max_pool2d(m, side)
    else:
        m = F.interpolate(m, size=(side, side), mode="nearest")
    return m[:, 0] > 0.5


def check_codes(codes: Tensor, side: int, name: str) -> None:
    if codes.dim() != 3 or codes.shape[1:] != (side, side):
        raise ValueError(f"{name} must have shape [B, {side}, {side}], got {tuple(codes.shape)}")


def batch_size_of(
    text_states: Tensor | None,
    init_codes: Tensor | None,
    context_codes: Tensor | None,
    num_samples: int | None,
) -> int:
    """Batch size from the first tensor given, else num_samples."""
    for t in (text_states, init_codes, context_codes):
        if t is not None:
            return t.shape[0]
    if num_samples is None:
        raise ValueError("give text_states, init_codes, context_codes or num_samples")
    return num_samples
