"""Text and images in, the tensors MedUnifier takes out (and generated ids back to text), as BLIP-2's processor.

The model works on tensors only; the `Processor` owns what turns raw inputs into them:

    tokenizer      texts -> {"input_ids", "attention_mask"} [B, T], right-padded, cut at `max_length`
    prompt layout  "[CLS] text [SEP]" and "[CLS] question [SEP] answer [SEP]" with the training truncation
                   (the `Collator` builds its batches with it); `question_prefixes` gives the left-padded
                   "[DEC] question [SEP]" prefixes after which the model decodes an answer
    images         path, bytes, PIL, NumPy or DICOM -> resized, normalised pixel_values [B, C, S, S], with the
                   image section's size, channels and mean/std (one value or one per channel)

    processor = Processor.from_pretrained("runs/demo/run")
    model = load_model("runs/demo/run")
    inputs = processor(images=["cxr.png"], questions=["Is there a pleural effusion?"])
    answers = model.generate_report(inputs["pixel_values"], prefix_ids=inputs["prefix_ids"],
                                    prefix_mask=inputs["prefix_mask"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medunifier.config import ImageConfig, MedUnifierConfig, config_from_dict
from medunifier.data.images import as_array, to_tensor, to_uint8
from medunifier.pretrained import SAVED_CONFIG_NAME, SAVED_TOKENIZER_DIR, saved_model_dir
from medunifier.tokens import load_tokenizer, special_ids

__all__ = ["Processor"]


class Processor:
    """The tokenizer, the question/answer prompt layout and the image preprocessing of one model.

    Args:
        tokenizer: a tokenizer with MedUnifier's special tokens (`medunifier.tokens.load_tokenizer`).
        max_length: the longest token sequence, special tokens included (the config's `text.max_length`).
        image: size, channels and normalisation of the images (the config's `image` section; default values
            when None).
    """

    def __init__(self, tokenizer: Any, max_length: int = 95, image: ImageConfig | None = None):
        if max_length < 4:
            raise ValueError(f"max_length must be at least 4, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image = image if image is not None else ImageConfig()
        self.special = special_ids(tokenizer)

    @classmethod
    def from_config(cls, config: MedUnifierConfig, tokenizer: Any | None = None) -> Processor:
        """The processor of a model built from `config`; `tokenizer` defaults to `text.tokenizer`'s."""
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.text.tokenizer)
        return cls(tokenizer, max_length=config.text.max_length, image=config.image)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Processor:
        """The processor saved with a model (`MedUnifier.save_pretrained`): its folder or a run folder."""
        folder = saved_model_dir(model_dir)
        data = json.loads((folder / SAVED_CONFIG_NAME).read_text())
        data["text"]["tokenizer"] = str(folder / SAVED_TOKENIZER_DIR)
        return cls.from_config(config_from_dict(data, str(folder / SAVED_CONFIG_NAME)))

    # ---------------------------------------------------------------------------------------------- text

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text, without special tokens and uncut."""
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """"[CLS] text [SEP]" ids and mask [B, T], right-padded to the longest, cut at `max_length` (default: the
        processor's)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length or self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_text(self, content: list[int]) -> list[int]:
        """[CLS] content [SEP], content cut to fit max_length (the closing [SEP] is always kept)."""
        return [self.special["cls"], *content[: self.max_length - 2], self.special["sep"]]

    def encode_qa(self, question: list[int], answer: list[int]) -> tuple[list[int], int]:
        """[CLS] question [SEP] answer [SEP] and the prefix length (question side).

        When too long, the question is cut first (down to half the budget), then the answer;
        at least one answer token always survives when the answer is not empty.
        """
        budget = self.max_length - 3
        if len(question) + len(answer) > budget:
            keep_q = min(len(question), max(budget - len(answer), budget // 2))
            if answer:
                keep_q = min(keep_q, budget - 1)
            question, answer = question[:keep_q], answer[: budget - keep_q]
        prefix = [self.special["cls"], *question, self.special["sep"]]
        return [*prefix, *answer, self.special["sep"]], len(prefix)

    def question_prefixes(self, questions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Left-padded "[DEC] question [SEP]" ids and mask [B, P]: the VQA training layout (and truncation),
        after which the model decodes the answer (`MedUnifier.generate_report(prefix_ids=, prefix_mask=)`)."""
        prompts = []
        for question in self.token_ids(questions):
            sequence, prefix_length = self.encode_qa(question, [])
            prompts.append([self.special["dec"], *sequence[1:prefix_length]])
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.special["pad"], dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        return ids, mask

    def decode(self, token_ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Generated ids [B, T] -> texts, special tokens dropped."""
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    # -------------------------------------------------------------------------------------------- images

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        """Images (paths, bytes, PIL images, [0, 1] or integer NumPy arrays, DICOM datasets) -> pixel_values
        [B, C, S, S]: resized to the image size, grey or RGB to the model's channels, normalised."""
        c = self.image
        return torch.stack([to_tensor(as_array(image), c.size, c.channels, c.mean, c.std) for image in images])

    def postprocess(self, pixel_values: Tensor) -> list[np.ndarray]:
        """pixel_values [B, C, S, S] (inputs or generated images) -> uint8 arrays [S, S] or [S, S, 3]."""
        return [to_uint8(image, self.image.mean, self.image.std) for image in pixel_values]

    # ------------------------------------------------------------------------------------------ together

    def __call__(self, images: Sequence[Any] | None = None, text: Sequence[str] | None = None,
                 questions: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Any of: `pixel_values` from images, `input_ids`/`attention_mask` from texts, `prefix_ids`/`prefix_mask`
        from questions."""
        if images is None and text is None and questions is None:
            raise ValueError("give images, text or questions")
        out: dict[str, Tensor] = {}
        if images is not None:
            out["pixel_values"] = self.preprocess(images)
        if text is not None:
            out.update(self.tokenize(text))
        if questions is not None:
            out["prefix_ids"], out["prefix_mask"] = self.question_prefixes(questions)
        return out
