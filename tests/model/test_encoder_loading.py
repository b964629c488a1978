"""Encoder weights: BLIP-2's Q-Former and query tokens, BERT text weights, vocabulary and pickle checks."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from medunifier.config import EncoderConfig
from medunifier.model.bert_weights import load_bert_weights
from medunifier.model.checkpoint_loading import WeightMismatchError, load_encoder_weights
from medunifier.model.encoder import ImageTextEncoder

H, LAYERS, HEADS, FFN, QUERIES, VISION = 32, 3, 2, 64, 4, 24
QFORMER = dict(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
               encoder_hidden_size=VISION, cross_attention_frequency=2)
BERT = dict(vocab_size=99, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
            max_position_embeddings=64)
TEXT_SIDE = ["embeddings.word_embeddings.*", "embeddings.position_embeddings.*", "embeddings.token_type_embeddings.*",
             "layers.*.text_ffn.*"]


def _randomise(model):
    with torch.no_grad():  # every tensor differs from any init (LayerNorms and zero biases too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def blip2(tmp_path):
    torch.manual_seed(0)
    text = T.OPTConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                       max_position_embeddings=32, word_embed_proj_dim=16)
    vision = dict(hidden_size=VISION, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                  image_size=16, patch_size=8)
    cfg = T.Blip2Config(vision_config=vision, qformer_config=QFORMER, text_config=text.to_dict(),
                        num_query_tokens=QUERIES)
    model = _randomise(T.Blip2ForConditionalGeneration(cfg)).eval()
    model.save_pretrained(tmp_path / "blip2")
    return model, tmp_path / "blip2"


@pytest.fixture
def bert(tmp_path):
    torch.manual_seed(1)
    model = _randomise(T.BertForMaskedLM(T.BertConfig(**BERT))).eval()
    model.save_pretrained(tmp_path / "bert")
    return model, tmp_path / "bert"


def encoder_config(**kw) -> EncoderConfig:
    base = dict(hidden_size=H, num_layers=LAYERS, num_heads=HEADS, intermediate_size=FFN, num_queries=QUERIES,
                cross_attention_freq=2, max_position_embeddings=64)
    return EncoderConfig(**{**base, **kw})


def test_blip2_qformer_query_outputs_match_transformers(blip2):
    model, folder = blip2
    config = encoder_config(pretrained=f"blip2:{folder}", ignore_weights=TEXT_SIDE)
    encoder = ImageTextEncoder(config, vocab_size=99, vision_width=VISION)
    report = load_encoder_weights(encoder, config)
    assert "query_tokens" in report["loaded"] and not report["skipped"]
    encoder.eval()
    image = torch.randn(3, 5, VISION)
    with torch.no_grad():
        ours = encoder(image_embeds=image, mode="query").query_states
        theirs = model.qformer(
            query_embeds=model.query_tokens.expand(3, -1, -1), encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(3, 5, dtype=torch.long),
        ).last_hidden_state
    assert ours.shape == theirs.shape == (3, QUERIES, H)
    assert (ours - theirs).abs().max() < 1e-5


def test_blip2_text_side_comes_from_bert(blip2, bert):
    qformer, qfolder = blip2
    bert_model, bfolder = bert
    config = encoder_config(pretrained=f"blip2:{qfolder}", text_pretrained=str(bfolder))
    encoder = ImageTextEncoder(config, vocab_size=99, vision_width=VISION)
    load_encoder_weights(encoder, config)
    layer, qlayer, blayer = encoder.layers[1], qformer.qformer.encoder.layer[1], bert_model.bert.encoder.layer[1]
    assert torch.equal(layer.text_ffn.up.weight, blayer.intermediate.dense.weight)  # text side: BERT
    assert torch.equal(layer.query_ffn.up.weight, qlayer.intermediate_query.dense.weight)  # queries: BLIP-2
    assert torch.equal(layer.self_attention.qkv.weight[:H], qlayer.attention.attention.query.weight)
    assert torch.equal(encoder.embeddings.word_embeddings.weight, bert_model.bert.embeddings.word_embeddings.weight)
    assert torch.equal(encoder.embeddings.layer_norm.weight, qformer.qformer.layernorm.weight)
    assert torch.equal(encoder.lm_head.dense.weight, bert_model.cls.predictions.transform.dense.weight)


def test_blip2_without_text_weights_lists_them(blip2):
    _, folder = blip2
    config = encoder_config(pretrained=f"blip2:{folder}")
    with pytest.raises(WeightMismatchError) as err:
        load_encoder_weights(ImageTextEncoder(config, vocab_size=99, vision_width=VISION), config)
    message = str(err.value)
    assert "embeddings.word_embeddings.weight" in message and "layers.2.text_ffn.up.weight" in message
    assert "encoder.text_pretrained" in message and "encoder.ignore_weights" in message
    assert "query_ffn" not in message and "cross_attention" not in message  # those are loaded


def test_blip2_size_mismatch_names_the_keys(blip2):
    _, folder = blip2
    config = encoder_config(pretrained=f"blip2:{folder}", ignore_weights=TEXT_SIDE, num_queries=8)
    with pytest.raises(ValueError, match="num_queries is 8 but num_query_tokens is 4"):
        load_encoder_weights(ImageTextEncoder(config, vocab_size=99, vision_width=VISION), config)
    config = encoder_config(pretrained=f"blip2:{folder}", ignore_weights=TEXT_SIDE)
    with pytest.raises(ValueError, match="vision hidden size is 16 but the Q-Former's encoder_hidden_size is 24"):
        load_encoder_weights(ImageTextEncoder(config, vocab_size=99, vision_width=16), config)


def test_bert_vocabulary_must_fit_the_embedding(bert):
    _, folder = bert
    config = encoder_config(pretrained=str(folder))
    load_encoder_weights(ImageTextEncoder(config, vocab_size=101, vision_width=VISION), config)  # + [DEC] [ENC]
    for size in (98, 120):
        with pytest.raises(ValueError, match=r"tokenizer has .* tokens but the checkpoint .* embeds 99"):
            load_encoder_weights(ImageTextEncoder(config, vocab_size=size, vision_width=VISION), config)


def test_bert_vocab_file_ids_are_compared(bert):
    _, folder = bert
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    from medunifier.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    encoder = ImageTextEncoder(encoder_config(), vocab_size=len(tokenizer), vision_width=VISION)
    load_bert_weights(encoder, folder, tokenizer)  # the folder's own tokenizer fits
    (folder / "vocab.txt").write_text("\n".join(tokens[:5] + tokens[6:] + tokens[5:6]) + "\n")
    with pytest.raises(ValueError, match=r"ids differ .* 94 tokens"):
        load_bert_weights(encoder, folder, tokenizer)


def test_bert_unused_tensors_are_an_error_unless_ignored(bert):
    from safetensors.torch import load_file, save_file

    _, folder = bert
    state = {k: v.clone() for k, v in load_file(str(folder / "model.safetensors")).items()}
    state["bert.encoder.layer.7.output.dense.weight"] = torch.zeros(2)  # a deeper BERT than the encoder
    state["bert.pooler.dense.weight"] = torch.zeros(2)  # known unused: fine
    save_file(state, str(folder / "model.safetensors"))
    config = encoder_config(pretrained=str(folder))
    with pytest.raises(WeightMismatchError, match=r"1 in the folder but unused: encoder\.layer\.7\.output"):
        load_encoder_weights(ImageTextEncoder(config, vocab_size=99, vision_width=VISION), config)
    config = encoder_config(pretrained=str(folder), ignore_weights=["encoder.layer.7.*"])
    load_encoder_weights(ImageTextEncoder(config, vocab_size=99, vision_width=VISION), config)


def test_pickle_only_bert_folder_says_how_to_convert(bert):
    _, folder = bert
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    config = encoder_config(pretrained=str(folder))
    with pytest.raises(ValueError, match=r"pickle file that medunifier never loads.*safe_serialization=True"):
        load_encoder_weights(ImageTextEncoder(config, vocab_size=99, vision_width=VISION), config)


def test_text_pretrained_needs_a_blip2_encoder():
    with pytest.raises(ValueError, match="blip2:FOLDER"):
        EncoderConfig(pretrained="minilm", text_pretrained="minilm")
