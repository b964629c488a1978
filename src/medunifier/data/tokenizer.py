"""Text tokenizer: a BERT-style WordPiece vocabulary plus the two task tokens MedUnifier needs.

The special tokens, `load_tokenizer` and `special_ids` live in `medunifier.tokens` (the base layer, which
the model reads too) and are re-exported here. `train_tokenizer` builds a new WordPiece vocabulary from
report text with the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from medunifier.tokens import (
    ALL_SPECIAL_TOKENS,
    CLS,
    CORE_SPECIAL_TOKENS,
    DEC,
    ENC,
    MASK,
    PAD,
    SEP,
    TASK_TOKENS,
    UNK,
    bert_backend,
    ensure_special_tokens,
    load_tokenizer,
    special_ids,
    wrap_backend,
)

__all__ = ["ALL_SPECIAL_TOKENS", "CLS", "CORE_SPECIAL_TOKENS", "DEC", "ENC", "MASK", "PAD", "SEP", "TASK_TOKENS",
           "UNK", "ensure_special_tokens", "load_tokenizer", "special_ids", "train_tokenizer"]


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8000,
                    min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a lower-cased BERT WordPiece vocabulary on `texts` and save it to `out_dir`.

    Special tokens take ids 0..6 in the order of ALL_SPECIAL_TOKENS; single sequences are encoded
    as `[CLS] $A [SEP]`. The folder loads back with `load_tokenizer(out_dir)`.
    """
    from tokenizers import models, trainers

    if vocab_size < len(ALL_SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed {len(ALL_SPECIAL_TOKENS)}, got {vocab_size}")
    backend = bert_backend(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(ALL_SPECIAL_TOKENS), continuing_subword_prefix="##",
                                        show_progress=False)
    backend.train_from_iterator((t for t in texts if t and t.strip()), trainer=trainer)
    tok = wrap_backend(backend)
    ensure_special_tokens(tok)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok
