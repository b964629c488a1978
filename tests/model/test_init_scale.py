"""Initialisation scale of the image-text encoder, and why `tiny` departs from BERT's values.

Trained from scratch, the image-dependent part of the query outputs starts small; with BERT's dropout
0.1 and 0.02 init it is a few per cent of the outputs and the dropout noise is larger than it, so ITC
had no signal to learn from (`benchmarks/query_image_dependence.py` measures both).
"""

from __future__ import annotations

import pytest
import torch

from medunifier.config import load_config
from medunifier.model.encoder import ImageTextEncoder


@pytest.mark.parametrize("std", [0.02, 0.05])
def test_initializer_range_sets_the_weight_std(std: float) -> None:
    config = load_config("tiny", [f"encoder.initializer_range={std}"]).encoder
    torch.manual_seed(0)
    encoder = ImageTextEncoder(config, vocab_size=1000, vision_width=192)
    layer = encoder.layers[0]
    for weight in (layer.self_attention.qkv.weight, layer.cross_attention.key_value.weight, layer.text_ffn.up.weight,
                   encoder.embeddings.word_embeddings.weight[1:]):
        assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert encoder.query_tokens.std().item() == pytest.approx(std, rel=0.15)  # 16 x 256 values
    assert torch.all(layer.self_attention.norm.weight == 1) and torch.all(layer.self_attention.qkv.bias == 0)
    assert torch.all(encoder.embeddings.word_embeddings.weight[0] == 0)  # the padding row


def _image_signal_and_noise(overrides: list[str]) -> tuple[float, float]:
    """Spread of the query outputs across images (no dropout), and between two passes over the same images
    with different dropout draws. The ResNet's BatchNorm uses batch statistics, as in training."""
    from medunifier.model.medunifier import MedUnifier

    torch.manual_seed(0)
    model = MedUnifier(load_config("tiny", overrides))
    model.train()
    torch.manual_seed(1)
    pixels = torch.rand(8, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        features = model.image_features(pixels)
        model.encoder.eval()
        signal = model.query_states(features).std(dim=0).mean().item()
        model.encoder.train()
        torch.manual_seed(2)
        first = model.query_states(features)
        torch.manual_seed(3)
        second = model.query_states(features)
    return signal, (first - second).std().item()


def test_tiny_query_outputs_depend_on_the_image_more_than_on_dropout() -> None:
    signal, noise = _image_signal_and_noise([])
    assert signal > 0.05
    assert signal > 10 * noise

    # BERT's values, which kept ITC at ln(32): the image signal is below the dropout noise
    bert_signal, bert_noise = _image_signal_and_noise(["encoder.dropout=0.1", "encoder.initializer_range=0.02"])
    assert bert_signal < bert_noise
    assert bert_signal < signal / 3
