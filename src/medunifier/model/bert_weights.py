"""Initialise `ImageTextEncoder` from a standard Hugging Face BERT checkpoint folder.

Reads `config.json` and `model.safetensors` (a `pytorch_model.bin` is refused: it is a pickle and is
never loaded) and maps BERT's parameter names onto ours, as BLIP-2 does for its Q-Former:

    embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm   -> embeddings.*
    encoder.layer.{i}.attention.self.{query,key,value}                        -> layers.{i}.self_attention.qkv
    encoder.layer.{i}.attention.output.{dense,LayerNorm}                      -> layers.{i}.self_attention.{out,norm}
    encoder.layer.{i}.intermediate.dense, output.{dense,LayerNorm}            -> layers.{i}.text_ffn and a copy
                                                                                 in layers.{i}.query_ffn
    cls.predictions.transform.{dense,LayerNorm}, cls.predictions.bias         -> lm_head.* (when present)

with or without the `bert.` prefix. Cross-attention and the query tokens stay randomly initialised
(normal 0.02, LayerNorm 1/0). Task experts (`gen_*`) are copies of the loaded modules; the modality
embeddings stay zero. Vocabulary rows beyond the checkpoint's (added [DEC]/[ENC] tokens)
start at the mean embedding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from medunifier.model.checkpoint_loading import WeightMismatchError, check_mismatch, read_tensors
from medunifier.model.encoder import ImageTextEncoder
from medunifier.pretrained import resolve_local
from medunifier.tokens import TASK_TOKENS

# checkpoint tensors a BERT folder may hold that the encoder never uses: pooler, next-sentence head, the
# cached position ids
_UNUSED = ("pooler.", "cls.seq_relationship.", "embeddings.position_ids")


def _read_checkpoint(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face BERT checkpoint folder")
    config = json.loads(config_path.read_text())
    return config, read_tensors(folder)  # safetensors only: a pickle-only folder is refused, with how to convert


def _bert_names(num_layers: int) -> list[str]:
    """The tensors every BERT checkpoint holds (without the `bert.` prefix)."""
    names = [f"embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    names += ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(num_layers):
        for module in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                       "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
            names += [f"encoder.layer.{i}.{module}.weight", f"encoder.layer.{i}.{module}.bias"]
    return names


def check_vocabulary(words: int, encoder: ImageTextEncoder, folder: Path, tokenizer: Any | None = None) -> None:
    """The tokenizer must be the checkpoint's: its vocabulary fills the checkpoint's `words` embedding rows,
    plus at most the task tokens the tokenizer adds ([DEC], [ENC]), and (when the folder holds a vocab.txt)
    gives every WordPiece the checkpoint's id."""
    ours = encoder.embeddings.word_embeddings.num_embeddings
    if not words <= ours <= words + len(TASK_TOKENS):
        raise ValueError(
            f"the text tokenizer has {ours} tokens but the checkpoint {folder} embeds {words}: its embedding rows "
            f"would be read for other tokens. Set text.tokenizer to the checkpoint's folder ({folder}), whose "
            f"vocabulary the weights were trained with (medunifier adds at most {', '.join(TASK_TOKENS)})."
        )
    vocab_file = folder / "vocab.txt"
    if tokenizer is None or not vocab_file.is_file():
        return
    ids = tokenizer.get_vocab()
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    moved = [f"{t!r} ({ids.get(t)} vs {i})" for i, t in enumerate(tokens) if ids.get(t) != i]
    if moved:
        raise ValueError(
            f"the text tokenizer's ids differ from the vocabulary of {folder} for {len(moved)} tokens, e.g. "
            f"{', '.join(moved[:5])} (ours vs the checkpoint's): set text.tokenizer to {folder}"
        )


def _check_sizes(config: dict, encoder: ImageTextEncoder, folder: Path) -> None:
    ours = encoder.config
    pairs = [
        ("hidden_size", "encoder.hidden_size", ours.hidden_size),
        ("num_hidden_layers", "encoder.num_layers", ours.num_layers),
        ("num_attention_heads", "encoder.num_heads", ours.num_heads),
        ("intermediate_size", "encoder.intermediate_size", ours.intermediate_size),
    ]
    wrong = [
        f"{our_key} is {value} but the checkpoint's {key} is {config.get(key)}"
        for key, our_key, value in pairs
        if config.get(key) != value
    ]
    if wrong:
        raise ValueError(f"BERT checkpoint {folder} does not fit the encoder config: " + "; ".join(wrong))
    act = config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"BERT checkpoint {folder} uses hidden_act='{act}'; the encoder implements 'gelu'")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"BERT checkpoint {folder}: only absolute position embeddings are supported")


def load_bert_weights(
    encoder: ImageTextEncoder, folder: str | Path, tokenizer: Any | None = None, ignore: Iterable[str] = ()
) -> dict:
    """Copy a BERT checkpoint into `encoder`; returns {loaded, initialised, skipped} name lists.

    `loaded`/`initialised` name our parameters, `skipped` the checkpoint tensors that were not used
    (pooler, NSP head, tied decoder weight). A BERT tensor the folder lacks, or a tensor it holds that is
    none of those, is an error listing them; unused ones may be named by an `ignore` pattern (fnmatch).

    Args:
        encoder: the encoder to initialise.
        folder: a local BERT folder (model.safetensors, config.json) or 'minilm'.
        tokenizer: the model's tokenizer, checked against the folder's vocab.txt when it has one.
        ignore: fnmatch patterns of checkpoint tensor names (without `bert.`) allowed to be unused.
    """
    folder = resolve_local(str(folder))
    config, state = _read_checkpoint(folder)
    _check_sizes(config, encoder, folder)
    if any(k.startswith("bert.") for k in state):
        state = {(k[len("bert.") :] if k.startswith("bert.") else k): v for k, v in state.items()}
    missing = [n for n in _bert_names(encoder.config.num_layers) if n not in state]
    unexpected = [
        n for n in state
        if not n.startswith(("embeddings.", "cls.predictions.")) and not n.startswith(_UNUSED)
        and not any(n.startswith(f"encoder.layer.{i}.") for i in range(encoder.config.num_layers))
    ]
    if missing:
        raise WeightMismatchError(
            f"{folder} is not a complete BERT checkpoint: it lacks {', '.join(missing)}. Name a BERT folder "
            "(BertModel / BertForMaskedLM / BertForPreTraining saved with safetensors)."
        )
    check_mismatch(f"encoder BERT checkpoint {folder}", [], unexpected, [], ignore, "encoder.ignore_weights")
    check_vocabulary(state["embeddings.word_embeddings.weight"].shape[0], encoder, folder, tokenizer)
    used: set[str] = set()
    loaded: list[str] = []
    params = dict(encoder.named_parameters())

    def take(name: str) -> Tensor:
        used.add(name)
        return state[name]

    def copy(ours: str, value: Tensor) -> None:
        target = params[ours]
        if target.shape != value.shape:
            raise ValueError(
                f"shape mismatch for {ours}: ours {tuple(target.shape)}, checkpoint {tuple(value.shape)}"
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
        loaded.append(ours)

    # embeddings
    words = take("embeddings.word_embeddings.weight")  # [V_ckpt, H]
    ours_words = params["embeddings.word_embeddings.weight"]
    with torch.no_grad():
        ours_words[: words.shape[0]] = words.to(ours_words.dtype)
        ours_words[words.shape[0] :] = words.mean(dim=0).to(ours_words.dtype)
    loaded.append("embeddings.word_embeddings.weight")
    positions = take("embeddings.position_embeddings.weight")
    n_pos = min(positions.shape[0], encoder.config.max_position_embeddings)
    if n_pos < encoder.config.max_position_embeddings:
        raise ValueError(
            f"encoder.max_position_embeddings ({encoder.config.max_position_embeddings}) exceeds the "
            f"checkpoint's ({positions.shape[0]})"
        )
    copy("embeddings.position_embeddings.weight", positions[:n_pos])
    token_types = take("embeddings.token_type_embeddings.weight")
    with torch.no_grad():
        ours_types = params["embeddings.token_type_embeddings.weight"]
        rows = min(ours_types.shape[0], token_types.shape[0])
        ours_types[:rows] = token_types[:rows].to(ours_types.dtype)
    loaded.append("embeddings.token_type_embeddings.weight")
    copy("embeddings.layer_norm.weight", take("embeddings.LayerNorm.weight"))
    copy("embeddings.layer_norm.bias", take("embeddings.LayerNorm.bias"))

    # layers
    for i in range(encoder.config.num_layers):
        src, dst = f"encoder.layer.{i}", f"layers.{i}"
        qkv = [take(f"{src}.attention.self.{n}.weight") for n in ("query", "key", "value")]
        copy(f"{dst}.self_attention.qkv.weight", torch.cat(qkv, dim=0))
        qkv_bias = [take(f"{src}.attention.self.{n}.bias") for n in ("query", "key", "value")]
        copy(f"{dst}.self_attention.qkv.bias", torch.cat(qkv_bias, dim=0))
        for ours, theirs in (("out", "dense"), ("norm", "LayerNorm")):
            for p in ("weight", "bias"):
                copy(f"{dst}.self_attention.{ours}.{p}", take(f"{src}.attention.output.{theirs}.{p}"))
        for ffn in ("text_ffn", "query_ffn"):  # BLIP-2: the query FFN starts as a copy of the text FFN
            for p in ("weight", "bias"):
                copy(f"{dst}.{ffn}.up.{p}", take(f"{src}.intermediate.dense.{p}"))
                copy(f"{dst}.{ffn}.down.{p}", take(f"{src}.output.dense.{p}"))
                copy(f"{dst}.{ffn}.norm.{p}", take(f"{src}.output.LayerNorm.{p}"))

    # masked-LM head, when the checkpoint has one (a BertForMaskedLM / BertForPreTraining save)
    head = "cls.predictions.transform"
    if f"{head}.dense.weight" in state:
        for p in ("weight", "bias"):
            copy(f"lm_head.dense.{p}", take(f"{head}.dense.{p}"))
            copy(f"lm_head.norm.{p}", take(f"{head}.LayerNorm.{p}"))
        bias_key = (
            "cls.predictions.bias" if "cls.predictions.bias" in state else "cls.predictions.decoder.bias"
        )
        if bias_key in state:
            bias = take(bias_key)
            ours_bias = params["lm_head.bias"]
            with torch.no_grad():
                ours_bias.zero_()
                ours_bias[: bias.shape[0]] = bias.to(ours_bias.dtype)
            loaded.append("lm_head.bias")

    # task experts: the generation experts start as copies of the (just loaded) understanding ones
    loaded += encoder.sync_generation_experts()

    # everything not loaded keeps (or gets) the BERT random init
    loaded_set = set(loaded)
    initialised = [name for name in params if name not in loaded_set]
    for name, module in encoder.named_modules():
        if any(f"{name}.{p}" in initialised for p in ("weight", "bias")) and name:
            encoder._init_weights(module)
    if encoder.modality_embeddings is not None:  # zero: a fresh model behaves as one without modalities
        torch.nn.init.zeros_(encoder.modality_embeddings.weight)
    skipped = sorted(k for k in state if k not in used)
    return {"loaded": loaded, "initialised": initialised, "skipped": skipped}


__all__ = ["load_bert_weights"]
