"""The inference surface the evaluators and the index read, as a structural type.

`MedUnifier` satisfies `ImageTextModel`; so does any stand-in with the same methods (the tests' band-image
model, a wrapped external encoder), which is why evaluators take this and not the concrete class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from torch import Tensor, nn

__all__ = ["ImageTextModel"]


class ImageTextModel(Protocol):
    """Embeddings, similarity, features and reports of an image-text model.

    Shapes: B images or texts, Q queries, E embedding size, L tokens, H encoder width.
    """

    config: Any  # a MedUnifierConfig, or an object with the same `image` and `encoder` sections

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """{"input_ids": [B, L], "attention_mask": [B, L]} on the model's device."""
        ...

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B, C, S, S] -> normalised per-query embeddings [B, Q, E]."""
        ...

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids [B, L] -> normalised text embeddings [B, E]."""
        ...

    def similarity(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """[Bi, Q, E] x [Bt, E] -> image-text similarity [Bi, Bt] (max over queries)."""
        ...

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B, C, S, S] -> the vision encoder's tokens [B, N, D]."""
        ...

    def query_states(self, image_embeds: Tensor) -> Tensor:
        """Vision tokens [B, N, D] -> the encoder's query outputs [B, Q, H]."""
        ...

    def generate_report(self, pixel_values: Tensor, **kwargs: Any) -> list[str]:
        """pixel_values [B, C, S, S] -> one generated report per image."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def eval(self) -> Any: ...
