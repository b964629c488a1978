"""Small fakes for the evaluators: images whose class is which horizontal band is bright, and a model
whose embeddings read that band (images) or the class word (texts), so expected scores can be worked out."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medunifier.config import ImageConfig
from medunifier.data.images import save_png
from medunifier.data.manifest import write_manifest

CLASSES = ("atelectasis", "cardiomegaly", "edema")
SIZE = 12  # three bands of 4 rows
REPORTS = {
    "atelectasis": "Mild bibasilar atelectasis. No pleural effusion.",
    "cardiomegaly": "Mild cardiomegaly. No pneumothorax.",
    "edema": "Moderate pulmonary edema. No focal consolidation.",
}


class FakeModel(nn.Module):
    """Implements the MedUnifier inference API on band images.

    encode_image -> [B, 2, 3]: query 0 = normalised (band means + 1) (about one-hot on the bright band),
    query 1 = the constant direction [1, 1, 1] / sqrt(3). encode_text -> one-hot of the class word.
    image_features / query_states feed a trainable linear map so the fine-tuning paths have parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(image=ImageConfig(size=SIZE, channels=1), encoder=SimpleNamespace(hidden_size=4))
        self.proj = nn.Linear(3, 4)

    def band_means(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b = pixel_values.shape[0]
        return pixel_values[:, 0].reshape(b, 3, -1).mean(-1)  # [B, 3] in [-1, 1]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[float(c in t.lower()) for c in CLASSES] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        q0 = F.normalize(self.band_means(pixel_values) + 1, dim=-1)
        q1 = torch.full_like(q0, 3**-0.5)
        return torch.stack([q0, q1], dim=1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(input_ids.float() + 1e-6, dim=-1)

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return torch.einsum("iqe,te->itq", image_embeds, text_embeds).amax(-1)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.band_means(pixel_values)[:, None, :]  # [B, 1, 3]

    def query_states(self, image_embeds: torch.Tensor) -> torch.Tensor:
        h = self.proj(image_embeds[:, 0])  # [B, 4]
        return torch.stack([h, -h * 0.5], dim=1)  # [B, 2, 4]

    def generate_report(self, pixel_values: torch.Tensor, **kwargs) -> list[str]:
        self.last_generate_kwargs = kwargs
        bands = self.band_means(pixel_values).argmax(-1).tolist()
        return [REPORTS[CLASSES[b]] for b in bands]


def band_image(cls: int, rng: np.random.Generator) -> np.ndarray:
    img = rng.uniform(0.0, 0.1, size=(SIZE, SIZE)).astype(np.float32)
    img[cls * 4 : (cls + 1) * 4] += 0.85
    return img


def make_band_manifest(root: Path, per_class: int, splits: dict[str, int] | None = None, seed: int = 0) -> Path:
    """`per_class` images of each class (per split when `splits` maps split -> per-class count)."""
    rng = np.random.default_rng(seed)
    records = []
    plan = splits or {"test": per_class}
    for split, count in plan.items():
        for c, name in enumerate(CLASSES):
            for i in range(count):
                rid = f"{split}-{name}-{i}"
                save_png(band_image(c, rng), root / "images" / f"{rid}.png")
                labels = {n: int(n == name) for n in CLASSES}
                records.append({"id": rid, "image": f"images/{rid}.png", "text": REPORTS[name], "labels": labels,
                                "split": split})
    path = root / "manifest.jsonl"
    write_manifest(records, path)
    return path


