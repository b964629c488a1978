"""Vision weights from local folders: standalone vision models and the vision part of full models."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from medunifier.config import ImageConfig, VisionConfig
from medunifier.model.checkpoint_loading import WeightMismatchError
from medunifier.model.vision import VisionEncoder

V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               encoder_hidden_size=32, vocab_size=99)
OPT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
           max_position_embeddings=64, word_embed_proj_dim=32)


def _blip2():
    cfg = T.Blip2Config(vision_config=V, qformer_config=QFORMER, text_config=T.OPTConfig(**OPT).to_dict(),
                        num_query_tokens=4)
    model = T.Blip2ForConditionalGeneration(cfg)
    return model, model.vision_model


def _instructblip():
    cfg = T.InstructBlipConfig(vision_config=V, qformer_config=QFORMER, text_config=T.OPTConfig(**OPT).to_dict(),
                               num_query_tokens=4)
    model = T.InstructBlipForConditionalGeneration(cfg)
    return model, model.vision_model


# name -> (vision.backbone, () -> (model to save, its vision module to compare with))
CASES = {
    "blip2-vision": ("blip2", lambda: (m := T.Blip2VisionModel(T.Blip2VisionConfig(**V, initializer_range=0.02)), m)),
    "blip2-full": ("blip2", _blip2),
    "instructblip-full": ("blip2", _instructblip),
    "clip-vision": ("clip", lambda: (m := T.CLIPVisionModel(T.CLIPVisionConfig(**V)), m)),
    "clip-full": ("clip", lambda: (m := T.CLIPModel(T.CLIPConfig(vision_config=V, text_config=TEXT)),
                                   m.vision_model)),
    "siglip-vision": ("siglip", lambda: (m := T.SiglipVisionModel(T.SiglipVisionConfig(**V)), m)),
    "siglip-full": ("siglip", lambda: (m := T.SiglipModel(T.SiglipConfig(vision_config=V, text_config=TEXT)),
                                       m.vision_model)),
    "vit": ("vit", lambda: (m := T.ViTModel(T.ViTConfig(**V)), m)),  # with its pooler, which is not used
    "vit-classifier": ("vit", lambda: (m := T.ViTForImageClassification(T.ViTConfig(**V)), m.vit)),
    "dinov2": ("dinov2", lambda: (m := T.Dinov2Model(T.Dinov2Config(**{**V, "intermediate_size": None}, mlp_ratio=2)),
                                  m)),
    "dinov2-classifier": ("dinov2", lambda: (
        m := T.Dinov2ForImageClassification(T.Dinov2Config(**{**V, "intermediate_size": None}, mlp_ratio=2)),
        m.dinov2)),
}


def _save(case: str, folder):
    torch.manual_seed(0)
    backbone, make = CASES[case]
    model, vision = make()
    with torch.no_grad():  # make every tensor differ from any init (LayerNorms, zero biases too)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return backbone, vision.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_vision_loads_from_standalone_and_full_folders(case, tmp_path):
    backbone, source = _save(case, tmp_path)
    enc = VisionEncoder(VisionConfig(backbone=backbone, pretrained=str(tmp_path)), ImageConfig(size=32, channels=3))
    loaded = enc.backbone.state_dict()
    theirs = source.state_dict()
    if backbone in ("clip", "siglip") and not any(k.startswith("vision_model.") for k in theirs):
        theirs = {f"vision_model.{k}": v for k, v in theirs.items()}  # CLIPModel.vision_model is the inner tower
    assert loaded.keys() <= theirs.keys()
    for name, value in loaded.items():
        assert torch.equal(value, theirs[name]), name
    # the features are the source tower's
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = source(pixel_values=x).last_hidden_state
    if backbone in ("blip2", "vit", "dinov2"):  # clip and siglip add a LayerNorm / the pooled token
        assert torch.allclose(enc(x), hidden, atol=1e-5)


def test_missing_tensors_are_an_error_listing_them_unless_ignored(tmp_path):
    _save("blip2-vision", tmp_path)
    state = {k: v.clone() for k, v in load_file(str(tmp_path / "model.safetensors")).items()}  # not the mmap
    del state["post_layernorm.weight"], state["post_layernorm.bias"]
    state["extra.head.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    image = ImageConfig(size=32, channels=3)
    with pytest.raises(WeightMismatchError) as err:
        VisionEncoder(VisionConfig(backbone="blip2", pretrained=str(tmp_path)), image)
    message = str(err.value)
    assert "post_layernorm.bias, post_layernorm.weight" in message and "extra.head.weight" in message
    assert "vision.ignore_weights" in message
    # the explicit opt-out: both kinds named by patterns
    enc = VisionEncoder(
        VisionConfig(backbone="blip2", pretrained=str(tmp_path), ignore_weights=["post_layernorm.*", "extra.*"]),
        image,
    )
    assert torch.equal(enc.backbone.post_layernorm.weight, torch.ones(32))  # random init kept (LayerNorm: 1)
    assert torch.equal(enc.backbone.embeddings.class_embedding, state["embeddings.class_embedding"])


def test_wrong_model_type_and_pickle_only_folders_are_refused(tmp_path):
    _save("clip-full", tmp_path / "clip")
    with pytest.raises(ValueError, match=r"set vision\.backbone: clip"):
        VisionEncoder(VisionConfig(backbone="blip2", pretrained=str(tmp_path / "clip")), ImageConfig(size=32))
    (tmp_path / "clip" / "model.safetensors").rename(tmp_path / "clip" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"never loads.*safe_serialization=True"):
        VisionEncoder(VisionConfig(backbone="clip", pretrained=str(tmp_path / "clip")), ImageConfig(size=32))


def test_wrong_shapes_are_listed(tmp_path):
    _save("vit", tmp_path)
    state = {k: v.clone() for k, v in load_file(str(tmp_path / "model.safetensors")).items()}  # not the mmap
    state["layernorm.weight"] = torch.ones(31)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightMismatchError, match=r"layernorm.weight \(31,\) \(model \(32,\)\)"):
        VisionEncoder(VisionConfig(backbone="vit", pretrained=str(tmp_path)), ImageConfig(size=32))
