"""Load pretrained weights from local Hugging Face folders, with every tensor accounted for.

Nothing here downloads, and nothing unpickles: weights come from `model.safetensors` (or a sharded
`model.safetensors.index.json`); a folder that holds only `pytorch_model.bin` is refused with the
command that converts it.

Vision backbones (`load_vision_backbone`) load from the folder of a standalone vision model or from the
vision part of a full model:

    vision.backbone   folder (config.json model_type)                     vision tensors
    blip2             Blip2VisionModel (blip_2_vision_model)              embeddings.*, encoder.*, post_layernorm.*
                      Blip2ForConditionalGeneration, Blip2Model (blip-2)  vision_model.*
                      InstructBlipForConditionalGeneration (instructblip) vision_model.*
    clip              CLIPVisionModel, CLIPModel                          vision_model.*
    siglip            SiglipVisionModel, SiglipModel                      vision_model.*
    vit               ViTModel, ViTForImageClassification                 (vit.)embeddings.*, encoder.*, layernorm.*
    dinov2            Dinov2Model, Dinov2ForImageClassification           (dinov2.)embeddings.*, encoder.*, layernorm.*
    resnet            ResNetModel, ResNetForImageClassification           (resnet.)embedder.*, encoder.*

The backbone's sizes come from the folder's config (the vision config of a full model). Tensors of the
backbone that the folder lacks ("missing") and tensors of the folder's vision part that the backbone does
not use ("unexpected") are an error that lists them, unless an `ignore` pattern (fnmatch, e.g.
"vision_model.head.*") names them: that is the explicit opt-out for deliberate differences. The other
parts of a full model (language model, Q-Former, text tower, classifier) are not the vision part and are
never read. A ViT's pooler is not used (the encoder reads every token) and is not reported.

BLIP-2's Q-Former and query tokens (`load_blip2_qformer`, `encoder.pretrained: blip2:FOLDER`) load into
`ImageTextEncoder`, see there; `load_encoder_weights` picks BERT or BLIP-2 from the encoder config.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import Tensor, nn
from transformers.initialization import no_init_weights  # a lazily loaded submodule: import it by name

from medunifier.pretrained import resolve_local

# vision.backbone -> (transformers model class, its config class, model_types a folder may declare)
VISION_MODELS = {
    "blip2": ("Blip2VisionModel", "Blip2VisionConfig",
              ("blip_2_vision_model", "blip-2", "instructblip_vision_model", "instructblip")),
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", ("clip_vision_model", "clip")),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", ("siglip_vision_model", "siglip")),
    "vit": ("ViTModel", "ViTConfig", ("vit",)),
    "dinov2": ("Dinov2Model", "Dinov2Config", ("dinov2",)),
    "resnet": ("ResNetModel", "ResNetConfig", ("resnet",)),
}
# (checkpoint prefix of the vision part, part of it to strip to get the backbone's own names)
_LAYOUTS = (
    ("", ""),
    ("vision_model.", "vision_model."),  # BLIP-2 / InstructBLIP full models
    ("vision_model.", ""),  # CLIP / SigLIP (vision model classes keep their `vision_model.` prefix)
    ("vit.", "vit."),
    ("dinov2.", "dinov2."),
    ("resnet.", "resnet."),
)
# tensors a folder may hold that the backbone, by design, never uses
_UNUSED = {"vit": ("pooler.*",)}


class WeightMismatchError(ValueError):
    """Missing, unexpected or wrongly shaped tensors when loading a checkpoint; the message lists them."""


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors weight files; a pickle-only folder is refused with how to convert it."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    pickles = [p.name for p in (folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json") if p.exists()]
    if pickles:
        raise ValueError(
            f"{folder} holds only {pickles[0]}, a pickle file that medunifier never loads. Convert it once, in an "
            "environment you trust, to safetensors, e.g. `transformers.AutoModel.from_pretrained(folder)"
            ".save_pretrained(folder, safe_serialization=True)` (use the model's own class for a full model)."
        )
    raise FileNotFoundError(f"{folder} has no model.safetensors (or model.safetensors.index.json)")


def read_tensors(folder: Path, keep: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Tensors of the folder's safetensors files; with `keep` (name prefixes), only names starting with one."""
    prefixes = tuple(keep) if keep is not None else None
    state: dict[str, Tensor] = {}
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if prefixes is None or name.startswith(prefixes):
                    state[name] = fh.get_tensor(name)
    return state


def tensor_names(folder: Path) -> list[str]:
    names: list[str] = []
    for path in safetensors_files(folder):
        with safe_open(str(path), framework="pt") as fh:
            names.extend(fh.keys())
    return names


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_mismatch(
    what: str, missing: list[str], unexpected: list[str], wrong_shape: list[str], ignore: Iterable[str], option: str
) -> None:
    """Raise `WeightMismatchError` listing every tensor not matched by an `ignore` pattern."""
    ignore = list(ignore)
    missing = [n for n in missing if not _matches(n, ignore)]
    unexpected = [n for n in unexpected if not _matches(n, ignore)]
    if not (missing or unexpected or wrong_shape):
        return
    lines = [f"{what} does not match the model:"]
    for title, names in (("missing from the folder", missing), ("in the folder but unused", unexpected),
                         ("of another shape", wrong_shape)):
        if names:
            lines.append(f"  {len(names)} {title}: " + ", ".join(sorted(names)))
    lines.append(
        f"Point the config at a folder of the right model, or, if the difference is deliberate, list the tensors "
        f"(fnmatch patterns) in {option}: tensors missing from the folder then keep their random init."
    )
    raise WeightMismatchError("\n".join(lines))


def _vision_config(backbone: str, folder: Path) -> transformers.PretrainedConfig:
    """The backbone's config from the folder: the folder's own, or the vision config of a full model."""
    _, config_name, model_types = VISION_MODELS[backbone]
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    data = json.loads(config_path.read_text())
    model_type = data.get("model_type")
    if model_type not in model_types:
        owner = next((b for b, (_, _, types) in VISION_MODELS.items() if model_type in types), None)
        hint = f"set vision.backbone: {owner}" if owner else f"vision.backbone {backbone} reads {', '.join(model_types)}"
        raise ValueError(f"{folder} holds a '{model_type}' model, not a {backbone} one: {hint}")
    if "vision_config" in data:  # a full model: its vision part
        data = data["vision_config"] or {}
    data = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "transformers_version")}
    return getattr(transformers, config_name).from_dict(data)


def load_vision_backbone(backbone: str, spec: str, ignore: Iterable[str] = ()) -> nn.Module:
    """Build `backbone` with the sizes of the local folder `spec` and load its vision weights.

    Args:
        backbone: a `VISION_MODELS` key (`vision.backbone`).
        spec: the folder (`vision.pretrained`): a standalone vision model or a full model, see the module doc.
        ignore: fnmatch patterns of backbone or checkpoint tensor names that may be missing or unused.
    """
    folder = resolve_local(spec)
    class_name = VISION_MODELS[backbone][0]
    cls = getattr(transformers, class_name)
    config = _vision_config(backbone, folder)
    extra = {"add_pooling_layer": False} if backbone == "vit" else {}
    if backbone != "resnet":  # convolutional: no attention implementation to choose
        config._attn_implementation = "sdpa"
    with torch.device("meta"):  # names and shapes only: nothing allocated
        shapes = {k: v.shape for k, v in cls(config, **extra).state_dict().items()}

    names = tensor_names(folder)

    def overlap(layout: tuple[str, str]) -> int:
        part, strip = layout
        return sum(1 for n in names if n.startswith(part) and n[len(strip):] in shapes)

    # the layout under which most of the backbone's names are in the folder; on a tie the narrowest vision part
    part, strip = max(_LAYOUTS, key=lambda layout: (overlap(layout), len(layout[0])))
    ours_of = {n: n[len(strip):] for n in names if n.startswith(part)}  # checkpoint name -> ours
    unused = _UNUSED.get(backbone, ())
    unexpected = [n for n, k in ours_of.items() if k not in shapes and not _matches(k, unused)]
    found = {k: n for n, k in ours_of.items() if k in shapes}
    missing = [k for k in shapes if k not in found]
    state = read_tensors(folder, keep=[part]) if part else read_tensors(folder)
    wrong_shape = [
        f"{n} {tuple(state[n].shape)} (model {tuple(shapes[k])})" for k, n in found.items()
        if state[n].shape != shapes[k]
    ]
    check_mismatch(f"vision.pretrained {folder} ({class_name})", missing, unexpected, wrong_shape, ignore,
                   "vision.ignore_weights")
    if missing:  # deliberately missing tensors keep the model's random init
        model = cls(config, **extra)
    else:
        with no_init_weights():
            model = cls(config, **extra)
    result = model.load_state_dict({k: state[n] for k, n in found.items()}, strict=False)
    assert sorted(result.missing_keys) == sorted(missing), result  # the check above saw the same names
    return model.eval()




BLIP2_PREFIX = "blip2:"
# encoder parameters a BLIP-2 generation checkpoint never holds and that may keep their init: the LM head
# (its Q-Former has none; BERT's, when `encoder.text_pretrained` has one, is loaded)
_QFORMER_OPTIONAL = ("lm_head.*",)


def _qformer_pairs(num_layers: int, cross_freq: int) -> list[tuple[str, list[str]]]:
    """(our parameter, the Q-Former tensors concatenated along dim 0 to make it) for a Blip2 Q-Former."""
    pairs = [(f"embeddings.layer_norm.{p}", [f"qformer.layernorm.{p}"]) for p in ("weight", "bias")]
    pairs.append(("query_tokens", ["query_tokens"]))
    for i in range(num_layers):
        src, dst = f"qformer.encoder.layer.{i}", f"layers.{i}"
        modules = [
            ("self_attention.qkv", [f"attention.attention.{n}" for n in ("query", "key", "value")]),
            ("self_attention.out", ["attention.output.dense"]),
            ("self_attention.norm", ["attention.output.LayerNorm"]),
            ("query_ffn.up", ["intermediate_query.dense"]),
            ("query_ffn.down", ["output_query.dense"]),
            ("query_ffn.norm", ["output_query.LayerNorm"]),
            # text FFN: only in Q-Formers with text input (use_qformer_text_input)
            ("text_ffn.up", ["intermediate.dense"]),
            ("text_ffn.down", ["output.dense"]),
            ("text_ffn.norm", ["output.LayerNorm"]),
        ]
        if i % cross_freq == 0:
            modules += [
                ("cross_attention.query", ["crossattention.attention.query"]),
                ("cross_attention.key_value", [f"crossattention.attention.{n}" for n in ("key", "value")]),
                ("cross_attention.out", ["crossattention.output.dense"]),
                ("cross_attention.norm", ["crossattention.output.LayerNorm"]),
            ]
        for ours, theirs in modules:
            for p in ("weight", "bias"):
                pairs.append((f"{dst}.{ours}.{p}", [f"{src}.{t}.{p}" for t in theirs]))
    return pairs


def _check_qformer_config(data: dict, encoder, folder: Path) -> None:
    q, ours = data.get("qformer_config") or {}, encoder.config
    pairs = [
        ("hidden_size", "encoder.hidden_size", ours.hidden_size),
        ("num_hidden_layers", "encoder.num_layers", ours.num_layers),
        ("num_attention_heads", "encoder.num_heads", ours.num_heads),
        ("intermediate_size", "encoder.intermediate_size", ours.intermediate_size),
        ("cross_attention_frequency", "encoder.cross_attention_freq", ours.cross_attention_freq),
        ("layer_norm_eps", "encoder.layer_norm_eps", ours.layer_norm_eps),
        ("encoder_hidden_size", "the vision hidden size", encoder.vision_width),
    ]
    wrong = [f"{our_key} is {value} but the Q-Former's {key} is {q.get(key)}"
             for key, our_key, value in pairs if q.get(key) != value]
    if data.get("num_query_tokens") != ours.num_queries:
        wrong.append(f"encoder.num_queries is {ours.num_queries} but num_query_tokens is {data.get('num_query_tokens')}")
    if q.get("hidden_act", "gelu") != "gelu":
        wrong.append(f"the Q-Former uses hidden_act={q.get('hidden_act')}, the encoder implements gelu")
    if wrong:
        raise ValueError(f"BLIP-2 checkpoint {folder} does not fit the config: " + "; ".join(wrong))


def load_blip2_qformer(encoder, spec: str, ignore: Iterable[str] = (), preloaded: Iterable[str] = ()) -> dict:
    """Copy a BLIP-2 folder's Q-Former and query tokens into `encoder` (an `ImageTextEncoder`).

    Blip2QFormerModel is the encoder's query path layer for layer (BERT post-LN layers, cross-attention in
    every `cross_attention_frequency`-th layer, the query feed-forward `intermediate_query`/`output_query`,
    the input LayerNorm `qformer.layernorm` = our embedding LayerNorm): the query outputs are the same.
    Its text-side parameters (word and position embeddings, the text feed-forward) are not in a BLIP-2
    generation checkpoint; `preloaded` names the encoder parameters already loaded from elsewhere (BERT).
    Any other encoder parameter left unloaded, or Q-Former tensor left unused, is an error unless `ignore`
    (fnmatch patterns of our or their names) names it.

    Args:
        encoder: the `ImageTextEncoder` to load into.
        spec: the folder of a `Blip2ForConditionalGeneration` / `Blip2Model` save.
        ignore: patterns of tensors allowed to stay unloaded or unused.
        preloaded: our parameter names loaded before (they count as present; the Q-Former overrides them).
    Returns:
        {loaded, initialised, skipped}: our parameters loaded / left as they were, their tensors unused.
    """
    folder = resolve_local(spec)
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if data.get("model_type") != "blip-2":
        raise ValueError(f"{folder} is not a BLIP-2 folder (config.json model_type '{data.get('model_type')}', "
                         "expected 'blip-2'): name a Blip2ForConditionalGeneration or Blip2Model save")
    _check_qformer_config(data, encoder, folder)
    state = read_tensors(folder, keep=["qformer.", "query_tokens"])
    params = dict(encoder.named_parameters())
    pairs = [(ours, theirs) for ours, theirs in _qformer_pairs(encoder.config.num_layers,
                                                                 encoder.config.cross_attention_freq)
             if all(t in state for t in theirs)]
    loaded = [ours for ours, _ in pairs]
    used = {t for _, theirs in pairs for t in theirs}
    wrong_shape = []
    for ours, theirs in pairs:
        value = torch.cat([state[t] for t in theirs], dim=0)
        if value.shape != params[ours].shape:
            wrong_shape.append(f"{'+'.join(theirs)} {tuple(value.shape)} (encoder {ours} {tuple(params[ours].shape)})")
    present = set(loaded) | set(preloaded)
    by_design = [n for n, _ in encoder.named_parameters() if n.startswith("modality_embeddings") or ".gen_" in n]
    missing = [n for n in params if n not in present and n not in by_design
               and not _matches(n, _QFORMER_OPTIONAL)]
    unexpected = [n for n in state if n not in used]
    check_mismatch(
        f"encoder.pretrained {BLIP2_PREFIX}{folder} (text-side weights come from encoder.text_pretrained, a BERT "
        "folder of the Q-Former's size)", missing, unexpected, wrong_shape, ignore, "encoder.ignore_weights",
    )
    with torch.no_grad():
        for ours, theirs in pairs:
            params[ours].copy_(torch.cat([state[t] for t in theirs], dim=0).to(params[ours].dtype))
    loaded += encoder.sync_generation_experts()  # the generation experts start as copies
    return {"loaded": loaded, "initialised": [n for n in params if n not in set(loaded) | present],
            "skipped": sorted(unexpected)}


def load_encoder_weights(encoder, config, tokenizer=None) -> dict:
    """Initialise `encoder` from `config.pretrained` (an `EncoderConfig`): a BERT folder (or 'minilm'), or
    'blip2:FOLDER' (BLIP-2's Q-Former and query tokens over BERT text weights from `config.text_pretrained`).

    Args:
        encoder: the `ImageTextEncoder`.
        config: its `EncoderConfig`.
        tokenizer: the model's tokenizer, checked against the BERT folder's vocabulary.
    """
    from medunifier.model.bert_weights import load_bert_weights

    spec = config.pretrained
    if not spec.startswith(BLIP2_PREFIX):
        return load_bert_weights(encoder, spec, tokenizer, config.ignore_weights)
    preloaded: list[str] = []
    if config.text_pretrained:
        preloaded = load_bert_weights(encoder, config.text_pretrained, tokenizer, config.ignore_weights)["loaded"]
    return load_blip2_qformer(encoder, spec[len(BLIP2_PREFIX):], config.ignore_weights, preloaded)


__all__ = [
    "BLIP2_PREFIX",
    "VISION_MODELS",
    "WeightMismatchError",
    "check_mismatch",
    "load_blip2_qformer",
    "load_encoder_weights",
    "load_vision_backbone",
    "read_tensors",
    "safetensors_files",
    "tensor_names",
]
