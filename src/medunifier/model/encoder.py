"""Image-text encoder E_Q: a compact BERT-style Q-Former on `F.scaled_dot_product_attention`.

One stack of BERT layers (post-LN as in BERT; `encoder.norm_position: pre` gives pre-LN residuals and a
final LayerNorm, for encoders trained from scratch) processes learnable query tokens and text tokens together; the
attention mask decides who sees whom, which is how one set of weights serves every objective: "text"
(ITC text side), "query" (ITC image side, TIG f_q), "bidirectional" (ITM), "causal" (ITG) and "prefix"
(VQA); `model.masking` tables the modes and holds their masks and the KV cache.

Padding (attention_mask == 0) is always masked as a key. Queries cross-attend to the vision features
in every `cross_attention_freq`-th layer (layer i when i % k == 0) and have their own feed-forward
(BLIP-2's intermediate_query/output_query); text never attends to the image directly.

Padding tokens skip the text feed-forward (their states are never read), which saves compute on
batches of reports of different lengths; their outputs are finite but meaningless.

Text position ids count the valid (non-padding) text tokens before each token, offset by the text
already in the KV cache: with right padding they are 0, 1, 2, ... as in BERT, and a batch of
questions of different lengths, padded, gets the same positions as the unpadded samples.
Weights can be initialised from a standard BERT checkpoint (`bert_weights.load_bert_weights`).

Task-routed experts (UniMedVL's mixture of transformers, `encoder.experts: task`): every layer also
holds a *generation* copy of the query and text feed-forwards (`gen_query_ffn`, `gen_text_ffn`) and,
with `encoder.expert_attention`, of the self-attention projections (`gen_self_attention`). A pass with
`role="generate"` (the text-to-image path) runs through them, a pass with `role="understand"` (ITC,
ITM, ITG, retrieval, reports) through the original modules; who attends to whom, the cross-attention,
embeddings and query tokens are shared. The generation experts start as copies of the understanding
ones. With `experts: shared` there are no such modules and `role` changes nothing.

Modality token (`encoder.modalities` non-empty): `modality_embeddings` [M + 1, H] (row 0 = unknown or
other), zero-initialised, is added to every query and text token embedding of a sample before the
embedding LayerNorm; `modality_ids` [B] selects the row per sample.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from medunifier.config import EncoderConfig
from medunifier.model.masking import CACHED_MODES, MODES, KVCache, build_attention_mask

ROLES = ("understand", "generate")


@dataclass
class EncoderOutput:
    query_states: Tensor | None  # [B, Q, H] last-layer states at the query positions (None: no queries)
    text_states: Tensor | None  # [B, T, H] last-layer states at the text positions (None: no text)
    past_key_values: KVCache | None


class Embeddings(nn.Module):
    """BERT embeddings: text = word + position + token_type[0]; queries prepended; then LayerNorm + dropout."""

    def __init__(self, config: EncoderConfig, vocab_size: int, pad_token_id: int):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(vocab_size, h, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(2, h)
        self.layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor | None,
        queries: Tensor | None,
        per_sample: Tensor | None = None,
    ) -> Tensor:
        """per_sample [B, 1, H] (the modality embedding) is added to every position before the LayerNorm."""
        parts = []
        if queries is not None:
            parts.append(queries)  # [B, Q, H]
        if input_ids is not None:
            text = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
            parts.append(text + self.token_type_embeddings.weight[0])  # [B, T, H]
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if per_sample is not None:
            x = x + per_sample
        return self.dropout(self.layer_norm(x))


def attention_core(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> Tensor:
    """scaled_dot_product_attention; on a CPU under bf16/fp16 autocast the attention core runs in float32.

    The CPU's reduced-precision flash-attention backward is slower than its float32 one, while the
    projections around it gain from bf16 (`benchmarks/bench_precision.py`).
    """
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast(device_type="cpu", enabled=False):
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=None if mask is None else mask.float(), dropout_p=dropout_p
            )
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _residual(x: Tensor, branch: Tensor, norm: nn.LayerNorm, pre_norm: bool) -> Tensor:
    """Post-LN LN(x + branch) (BERT), or pre-LN x + branch (the branch already read LN(x))."""
    return x + branch if pre_norm else norm(x + branch)


class SelfAttention(nn.Module):
    """Multi-head self-attention with BERT's post-LN residual LN(x + dropout(W_o attn(x))), or the pre-LN
    x + dropout(W_o attn(LN(x))) when `pre_norm`."""

    def __init__(self, hidden: int, heads: int, dropout: float, eps: float, pre_norm: bool = False):
        super().__init__()
        self.pre_norm = pre_norm
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)  # BERT's query, key, value stacked
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(
        self, x: Tensor, mask: Tensor | None, past: tuple[Tensor, Tensor] | None = None, rows: int | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, S, H] -> [B, S, H], or [B, rows, H] for the first `rows` positions only (keys: all S)."""
        b, s, h = x.shape
        inputs = self.norm(x) if self.pre_norm else x
        q, k, v = self.qkv(inputs).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, h, S, d]
        if rows is not None:
            q, x = q[:, :, :rows], x[:, :rows]
            if mask is not None and mask.shape[-2] > 1:
                mask = mask[..., :rows, :]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, h, P + S, d]
            v = torch.cat([past[1], v], dim=2)
        a = attention_core(q, k, v, mask, self.attn_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(b, q.shape[2], h)
        return _residual(x, self.dropout(self.out(a)), self.norm, self.pre_norm), (k, v)


class CrossAttention(nn.Module):
    """Queries attend to the vision features f_v (all of them valid), post-LN (or pre-LN) residual."""

    def __init__(self, hidden: int, heads: int, vision_width: int, dropout: float, eps: float, pre_norm: bool = False):
        super().__init__()
        self.pre_norm = pre_norm
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(vision_width, 2 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: Tensor, image_embeds: Tensor) -> Tensor:
        b, s, h = x.shape
        n = image_embeds.shape[1]
        inputs = self.norm(x) if self.pre_norm else x
        q = self.query(inputs).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # [B, h, Q, d]
        k, v = self.key_value(image_embeds).view(b, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = attention_core(q, k, v, None, self.attn_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(b, s, h)
        return _residual(x, self.dropout(self.out(a)), self.norm, self.pre_norm)


class FeedForward(nn.Module):
    """BERT feed-forward: LN(x + dropout(W_2 gelu(W_1 x))), or x + dropout(W_2 gelu(W_1 LN(x))) when `pre_norm`."""

    def __init__(self, hidden: int, intermediate: int, dropout: float, eps: float, pre_norm: bool = False):
        super().__init__()
        self.pre_norm = pre_norm
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        inputs = self.norm(x) if self.pre_norm else x
        return _residual(x, self.dropout(self.down(F.gelu(self.up(inputs)))), self.norm, self.pre_norm)


class EncoderLayer(nn.Module):
    """Self-attention, cross-attention (queries only, some layers), separate query and text feed-forwards.

    The `gen_*` modules (task experts, None otherwise) replace their namesakes in role="generate" passes.
    """

    def __init__(self, config: EncoderConfig, vision_width: int, has_cross_attention: bool):
        super().__init__()
        h, eps, p = config.hidden_size, config.layer_norm_eps, config.dropout
        pre = config.norm_position == "pre"
        self.self_attention = SelfAttention(h, config.num_heads, p, eps, pre)
        self.cross_attention = (
            CrossAttention(h, config.num_heads, vision_width, p, eps, pre) if has_cross_attention else None
        )
        self.text_ffn = FeedForward(h, config.intermediate_size, p, eps, pre)
        self.query_ffn = FeedForward(h, config.intermediate_size, p, eps, pre)
        self.gen_self_attention: SelfAttention | None = None
        self.gen_text_ffn: FeedForward | None = None
        self.gen_query_ffn: FeedForward | None = None

    def add_generation_experts(self, attention: bool) -> None:
        """Create the generation experts as copies of the understanding modules (no random draws)."""
        self.gen_text_ffn = copy.deepcopy(self.text_ffn)
        self.gen_query_ffn = copy.deepcopy(self.query_ffn)
        if attention:
            self.gen_self_attention = copy.deepcopy(self.self_attention)

    def expert_pairs(self) -> list[tuple[str, str]]:
        """(generation module name, understanding module name) for every generation expert present."""
        names = ("self_attention", "text_ffn", "query_ffn")
        return [(f"gen_{n}", n) for n in names if getattr(self, f"gen_{n}") is not None]

    def forward(
        self,
        x: Tensor,
        num_queries: int,
        mask: Tensor | None,
        image_embeds: Tensor | None,
        past: tuple[Tensor, Tensor] | None = None,
        text_rows: Tensor | None = None,
        generate: bool = False,
        queries_only: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, Q + T, H] -> same; text_rows: flat indices of the non-padding text tokens (None: all).

        generate: use the generation experts where this layer has them. queries_only: return [B, Q, H],
        the query rows alone (text still serves as keys), skipping the text rows' attention and FFN.
        """
        attention, query_ffn, text_ffn = self.self_attention, self.query_ffn, self.text_ffn
        if generate:
            attention = self.gen_self_attention or attention
            query_ffn = self.gen_query_ffn or query_ffn
            text_ffn = self.gen_text_ffn or text_ffn
        x, kv = attention(x, mask, past, num_queries if queries_only else None)  # [B, Q + T or Q, H]
        if num_queries == 0:
            return self._text_ffn(text_ffn, x, text_rows), kv
        queries = x[:, :num_queries]
        if self.cross_attention is not None and image_embeds is not None:
            queries = self.cross_attention(queries, image_embeds)
        queries = query_ffn(queries)
        if x.shape[1] == num_queries:
            return queries, kv
        return torch.cat([queries, self._text_ffn(text_ffn, x[:, num_queries:], text_rows)], dim=1), kv

    @staticmethod
    def _text_ffn(ffn: FeedForward, text: Tensor, text_rows: Tensor | None) -> Tensor:
        """The text feed-forward on non-padding tokens only (padding keeps its attention output)."""
        if text_rows is None:
            return ffn(text)
        b, t, h = text.shape
        flat = text.reshape(b * t, h)
        return flat.index_copy(0, text_rows, ffn(flat.index_select(0, text_rows))).view(b, t, h)


class LMHead(nn.Module):
    """BERT prediction head transform (dense + gelu + LayerNorm); the decoder is the tied word embedding."""

    def __init__(self, hidden: int, vocab_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, word_embeddings: Tensor) -> Tensor:
        return F.linear(self.norm(F.gelu(self.dense(x))), word_embeddings, self.bias)


class ImageTextEncoder(nn.Module):
    """E_Q: BERT layers over [query tokens | text], queries cross-attending to the image (see module doc)."""

    def __init__(self, config: EncoderConfig, vocab_size: int, vision_width: int, pad_token_id: int = 0):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_queries = config.num_queries
        self.vocab_size = vocab_size
        self.vision_width = vision_width
        self.pad_token_id = pad_token_id
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, config.hidden_size))  # [1, Q, H]
        self.embeddings = Embeddings(config, vocab_size, pad_token_id)
        self.layers = nn.ModuleList(
            EncoderLayer(config, vision_width, has_cross_attention=i % config.cross_attention_freq == 0)
            for i in range(config.num_layers)
        )
        # pre-LN leaves the residual stream unnormalised: one LayerNorm on the last layer's output
        self.final_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_position == "pre" else None
        )
        self.lm_head = LMHead(config.hidden_size, vocab_size, config.layer_norm_eps)
        # recompute each layer in the backward pass instead of keeping its activations (train only)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        # made after the random init, without random draws: a config with experts or modalities starts
        # from the same weights as one without, for the same seed
        if config.experts == "task":
            for layer in self.layers:
                layer.add_generation_experts(attention=config.expert_attention)
        self.modality_embeddings: nn.Embedding | None = None
        if config.modalities:
            n = len(config.modalities) + 1  # row 0: unknown / other
            self.modality_embeddings = nn.Embedding(n, config.hidden_size, _weight=torch.zeros(n, config.hidden_size))

    def expert_pairs(self) -> list[tuple[str, str]]:
        """(generation, understanding) module names, e.g. ("layers.0.gen_text_ffn", "layers.0.text_ffn")."""
        return [(f"layers.{i}.{g}", f"layers.{i}.{u}") for i, layer in enumerate(self.layers) for g, u in layer.expert_pairs()]

    @torch.no_grad()
    def sync_generation_experts(self) -> list[str]:
        """Copy every understanding expert's weights into its generation expert; returns the parameter names set."""
        copied = []
        for gen_name, understand_name in self.expert_pairs():
            gen, understand = self.get_submodule(gen_name), self.get_submodule(understand_name)
            for (name, p_gen), p_und in zip(gen.named_parameters(), understand.parameters()):
                p_gen.copy_(p_und)
                copied.append(f"{gen_name}.{name}")
        return copied

    def _init_weights(self, module: nn.Module) -> None:
        """BERT initialisation: normal(0, initializer_range) weights, zero biases, LayerNorm (1, 0), zero padding row."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        mode: str = "text",
        prefix_lengths: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        query_embeds: Tensor | None = None,
        role: str = "understand",
        modality_ids: Tensor | None = None,
        queries_only: bool = False,
    ) -> EncoderOutput:
        """Encode queries and/or text under `mode` (see the module docstring).

        input_ids [B, T], attention_mask [B, T] (1 = token, 0 = padding), image_embeds [B, N, Dv],
        query_embeds [B or 1, Q, H] (replaces the learned query tokens), prefix_lengths [B] ("prefix").
        With `use_cache` ("causal"/"prefix"), the returned KVCache lets the next call pass only new
        input_ids; cross-attention acts at query positions only, so later calls need no image.
        role: "understand" or "generate" (which task experts run; no effect with shared experts; a
        cached decode must keep one role). modality_ids [B] long (0 = unknown, also when None): the
        modality embedding added to this call's new tokens; ignored when `encoder.modalities` is empty.
        queries_only: the last layer computes the query rows alone and text_states is None (ITM reads only
        the queries): the same query_states without the last layer's text attention rows, output projection
        and feed-forward.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
        if role not in ROLES:
            raise ValueError(f"unknown role '{role}' (choose from {', '.join(ROLES)})")
        past = past_key_values
        has_queries = image_embeds is not None or query_embeds is not None
        if (use_cache or past is not None) and mode not in CACHED_MODES:
            raise ValueError(f"the KV cache is for modes {CACHED_MODES}, not '{mode}'")
        if past is not None and has_queries:
            raise ValueError(
                "image_embeds/query_embeds must not be given with past_key_values: queries are cached"
            )
        if queries_only and (use_cache or not has_queries):
            raise ValueError("queries_only needs queries (image_embeds/query_embeds) and no use_cache")
        if mode == "text" and has_queries:
            raise ValueError("mode='text' has no queries: do not pass image_embeds/query_embeds")
        if mode == "query":
            if input_ids is not None:
                raise ValueError("mode='query' takes no text (input_ids must be None)")
            if not has_queries:
                raise ValueError("mode='query' needs image_embeds or query_embeds")
        elif input_ids is None:
            raise ValueError(f"mode='{mode}' needs input_ids")

        ref = (
            input_ids
            if input_ids is not None
            else (image_embeds if image_embeds is not None else query_embeds)
        )
        batch, device = ref.shape[0], ref.device
        dtype = self.query_tokens.dtype

        queries = None
        if has_queries:
            queries = query_embeds if query_embeds is not None else self.query_tokens
            queries = queries.to(dtype).expand(batch, -1, -1)  # [B, Q, H]
        num_queries = 0 if queries is None else queries.shape[1]
        if image_embeds is not None:
            image_embeds = image_embeds.to(dtype)

        if input_ids is not None:
            text_valid = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones_like(input_ids, dtype=torch.bool)
            )
            past_lengths = past.text_lengths if past is not None else input_ids.new_zeros(batch)
            position_ids = (past_lengths[:, None] + text_valid.long().cumsum(1) - 1).clamp(min=0)  # [B, T]
            # without a cache the positions are below the text length: the check needs no host-device sync then
            longest = self.config.max_position_embeddings
            if (past is not None or input_ids.shape[1] > longest) and int(position_ids.max()) >= longest:
                raise ValueError(
                    f"text position {int(position_ids.max())} exceeds encoder.max_position_embeddings "
                    f"({self.config.max_position_embeddings})"
                )
        else:
            text_valid = torch.ones(batch, 0, dtype=torch.bool, device=device)
            position_ids = None

        mask = build_attention_mask(
            mode,
            num_queries,
            text_valid,
            past_key_mask=None if past is None else past.key_mask,
            past_num_queries=0 if past is None else past.num_queries,
            prefix_lengths=prefix_lengths,
        )
        if (
            mask is not None
        ):  # additive form, made once for all layers (SDPA would convert a bool mask per call)
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
        x = self.embeddings(input_ids, position_ids, queries, self._modality_vectors(modality_ids, batch))
        new_keys, new_values = [], []
        # padding tokens skip the text feed-forward (2/3 of a layer's FLOPs): nothing ever reads them
        text_rows = None if bool(text_valid.all()) else text_valid.flatten().nonzero().squeeze(1)
        generate = role == "generate"
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else (past.keys[i], past.values[i])
            args = (x, num_queries, mask, image_embeds, layer_past, text_rows, generate, queries_only and i == last)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # the RNG state is replayed in the recomputation: dropout masks, loss and gradients are unchanged
                x, (k, v) = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x, (k, v) = layer(*args)
            if use_cache:
                new_keys.append(k)
                new_values.append(v)
        if self.final_norm is not None:
            x = self.final_norm(x)

        cache = None
        if use_cache:
            new_key_mask = torch.cat([text_valid.new_ones(batch, num_queries), text_valid], dim=1)
            cache = KVCache(
                keys=new_keys,
                values=new_values,
                key_mask=new_key_mask if past is None else torch.cat([past.key_mask, new_key_mask], dim=1),
                text_lengths=(
                    past.text_lengths if past is not None else text_valid.new_zeros(batch, dtype=torch.long)
                )
                + text_valid.long().sum(1),
                num_queries=past.num_queries if past is not None else num_queries,
            )
        return EncoderOutput(
            query_states=x[:, :num_queries] if num_queries else None,
            text_states=x[:, num_queries:] if input_ids is not None and not queries_only else None,
            past_key_values=cache,
        )

    def _modality_vectors(self, modality_ids: Tensor | None, batch: int) -> Tensor | None:
        """modality_ids [B] -> [B, 1, H] embeddings; no ids = unknown (row 0); None when the feature is off."""
        if self.modality_embeddings is None:
            return None
        if modality_ids is None:
            return self.modality_embeddings.weight[0][None, None]  # [1, 1, H]
        if modality_ids.shape != (batch,):
            raise ValueError(f"modality_ids must have shape [{batch}], got {tuple(modality_ids.shape)}")
        n = self.modality_embeddings.num_embeddings
        if bool(((modality_ids < 0) | (modality_ids >= n)).any()):
            raise ValueError(f"modality_ids must lie in [0, {n - 1}] (0 = unknown), got {modality_ids.tolist()}")
        return self.modality_embeddings(modality_ids.to(self.query_tokens.device))[:, None]

    def lm_logits(self, text_states: Tensor) -> Tensor:
        """[..., H] -> [..., V]: BERT prediction head, decoder tied to the word embeddings (+ bias)."""
        return self.lm_head(text_states, self.embeddings.word_embeddings.weight)

    def resize_token_embeddings(self, n: int) -> None:
        """Grow (or shrink) the vocabulary to n rows; new rows start at the mean embedding, new biases at 0."""
        old = self.embeddings.word_embeddings
        if n == old.num_embeddings:
            return
        keep = min(n, old.num_embeddings)
        pad = self.pad_token_id if self.pad_token_id < n else None
        new = nn.Embedding(
            n, old.embedding_dim, padding_idx=pad, device=old.weight.device, dtype=old.weight.dtype
        )
        bias = torch.zeros(n, device=old.weight.device, dtype=self.lm_head.bias.dtype)
        with torch.no_grad():
            new.weight[:keep] = old.weight[:keep]
            if n > keep:
                new.weight[keep:] = old.weight.mean(dim=0)
            bias[:keep] = self.lm_head.bias[:keep]
        self.embeddings.word_embeddings = new
        self.lm_head.bias = nn.Parameter(bias)
        self.vocab_size = n

    def num_cross_attention_layers(self) -> int:
        return sum(layer.cross_attention is not None for layer in self.layers)


__all__ = ["MODES", "ROLES", "EncoderOutput", "ImageTextEncoder", "KVCache", "build_attention_mask"]
