"""The text vocabulary the data and model layers share: MedUnifier's special tokens and reading a tokenizer.

The image-text encoder reads `[CLS] text [SEP]` for ITC/ITM and `[DEC] text [SEP]` for ITG (the
first token is swapped by the model, BLIP-2 style); `[ENC]` marks the multimodal (ITM) input.
`load_tokenizer` takes the packaged MiniLM vocabulary (30522 WordPieces) or a local folder and
makes sure every special token exists, adding the missing ones at the end of the vocabulary
(so MiniLM grows to 30524: the model's embedding table is sized with `len(tokenizer)`).

This module sits in the base layer with `config`: the model sizes its embeddings and swaps task tokens by
these names, and `medunifier.data` (the `Processor`, `train_tokenizer`) builds on the same functions.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from medunifier.pretrained import resolve_local

__all__ = ["ALL_SPECIAL_TOKENS", "CLS", "CORE_SPECIAL_TOKENS", "DEC", "ENC", "MASK", "PAD", "SEP", "TASK_TOKENS",
           "UNK", "bert_backend", "ensure_special_tokens", "load_tokenizer", "special_ids", "wrap_backend"]

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
DEC, ENC = "[DEC]", "[ENC]"
# attribute name on a HF tokenizer -> token text
CORE_SPECIAL_TOKENS = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}
TASK_TOKENS = (DEC, ENC)
ALL_SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK, DEC, ENC)  # ids 0..6 in a trained vocabulary


def _add_extra_special_tokens(tok: PreTrainedTokenizerFast, tokens: list[str]) -> None:
    """Register extra special tokens without replacing existing ones (key renamed in transformers 5)."""
    params = inspect.signature(tok.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:
        tok.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    else:  # transformers 4.x
        tok.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)


def _is_single_token(tok: PreTrainedTokenizerFast, token: str) -> bool:
    return token in tok.get_vocab() and tok.tokenize(token) == [token]


def ensure_special_tokens(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Make [PAD] [UNK] [CLS] [SEP] [MASK] the tokenizer's special tokens and add [DEC] [ENC] if missing."""
    for attr, token in CORE_SPECIAL_TOKENS.items():
        if getattr(tok, attr, None) is None:
            tok.add_special_tokens({attr: token})  # reuses the id when the token is already in the vocab
    missing = [t for t in TASK_TOKENS if not _is_single_token(tok, t) or t not in tok.all_special_tokens]
    if missing:
        _add_extra_special_tokens(tok, missing)
    return tok


def bert_backend(wordpiece: Any, lowercase: bool = True) -> Any:
    """A `tokenizers.Tokenizer` with BERT's normaliser, pre-tokeniser and decoder around a WordPiece model."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers

    backend = Tokenizer(wordpiece)
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True, handle_chinese_chars=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def wrap_backend(backend: Any) -> PreTrainedTokenizerFast:
    """Add `[CLS] $A [SEP]` post-processing and wrap as a transformers tokenizer with BERT's special tokens."""
    from tokenizers import processors

    cls_id, sep_id = backend.token_to_id(CLS), backend.token_to_id(SEP)
    if cls_id is None or sep_id is None:
        raise ValueError(f"the vocabulary lacks {CLS} or {SEP}")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, cls_id), (SEP, sep_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=512, padding_side="right",
                                   **CORE_SPECIAL_TOKENS)


def _from_bert_vocab(folder: Path) -> PreTrainedTokenizerFast:
    from tokenizers import models

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    wordpiece = models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token=UNK)
    return wrap_backend(bert_backend(wordpiece, lowercase=bool(config.get("do_lower_case", True))))


def load_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """'minilm' (the packaged BERT uncased WordPiece) or a local tokenizer folder; never downloads."""
    folder = resolve_local(spec)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise FileNotFoundError(f"no tokenizer in '{folder}' (expected tokenizer.json or a BERT vocab.txt)")
    try:
        if (folder / "tokenizer.json").is_file():
            tok = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        else:  # a BERT folder with only vocab.txt (+ tokenizer_config.json)
            tok = _from_bert_vocab(folder)
    except Exception as err:  # transformers raises many types for a broken folder
        raise ValueError(f"cannot load the tokenizer in '{folder}': {type(err).__name__}: {err}") from None
    return ensure_special_tokens(tok)


def special_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of the tokens the model uses by name: pad, cls, sep, mask, unk, dec, enc."""
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in
           (("pad", PAD), ("cls", CLS), ("sep", SEP), ("mask", MASK), ("unk", UNK), ("dec", DEC), ("enc", ENC))}
    unk = ids["unk"]
    missing = [name for name, i in ids.items() if i is None or (i == unk and name != "unk")]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}; load it with load_tokenizer()")
    return ids
