"""Stage 0's own evaluation: a linear probe of the frozen pooled features and, for an image-text run,
zero-shot accuracy and image-to-text precision@1 through the stage-0 heads, all on the 5x200 set.

    results = evaluate_stage0(DIR, "data/manifest.jsonl")  # DIR: the `medunifier pretrain-vision --out`
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from medunifier.config import Stage0Config
from medunifier.model.stage0 import ImageTower, TextTower
from medunifier.train.stage0 import RUN

__all__ = ["evaluate_stage0", "pooled_features"]


@torch.no_grad()
def pooled_features(tower: ImageTower, records: list[Any], root: Path, image: Any, batch_size: int = 256) -> Tensor:
    """Mean-pooled backbone features [N, Dv] of records' images."""
    from medunifier.data.images import load_image, to_tensor

    tower.eval()
    out = []
    for i in range(0, len(records), batch_size):
        pixels = torch.stack([to_tensor(load_image(root / r.image), image.size, image.channels, image.mean,
                                        image.std) for r in records[i:i + batch_size]])
        out.append(tower.pooled(pixels).float())
    return torch.cat(out)


def evaluate_stage0(out_dir: str | Path, data: str | Path, five: str | Path | None = None) -> dict[str, Any]:
    """Linear-probe AUROC of the frozen pooled features (train split -> 5x200), and for an image-text run
    zero-shot accuracy with the chexpert5 prompts and image-to-text precision@1 on the 5x200 set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from medunifier.data.manifest import IMAGE_TEXT_TASKS, load_records
    from medunifier.eval.common import classify_records
    from medunifier.eval.zeroshot import load_prompts

    out = Path(out_dir)
    config = Stage0Config.model_validate(json.loads((out / RUN / "config.json").read_text()))
    data = Path(data)
    five = Path(five) if five is not None else data.parent / "manifest_5x200.jsonl"
    uses_text = config.objective in ("text", "both")
    text_tower = TextTower(config.text_encoder, max_length=config.text_max_length) if uses_text else None
    vision = config.vision.model_copy(update={"pretrained": str(out)})
    tower = ImageTower(vision, config.image, text_tower.width if uses_text else 0, config.embed_dim)
    heads = load_file(str(out / RUN / "heads.safetensors"))
    tower.load_state_dict({k[len("tower."):]: v for k, v in heads.items() if k.startswith("tower.")}, strict=False)
    classes = ["atelectasis", "cardiomegaly", "consolidation", "edema", "pleural_effusion"]
    train_records = [r for r in load_records(data, splits=["train"]) if r.image and r.task in IMAGE_TEXT_TASKS]
    five_records, targets, _ = classify_records(load_records(five), classes)
    x_train = pooled_features(tower, train_records, data.parent, config.image).numpy()
    x_five = pooled_features(tower, five_records, five.parent, config.image).numpy()
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_five = (x_train - mean) / std, (x_five - mean) / std
    probs, aurocs = [], {}
    for k, name in enumerate(classes):
        y = np.array([int(r.labels.get(name, 0) == 1) for r in train_records])
        clf = LogisticRegression(max_iter=2000, C=0.5).fit(x_train, y)
        p = clf.predict_proba(x_five)[:, 1]
        probs.append(p)
        aurocs[name] = float(roc_auc_score(targets == k, p))
    results: dict[str, Any] = {"linear_probe": {"accuracy_5way": float((np.stack(probs, 1).argmax(1) == targets).mean()),
                                                "auroc_mean": float(np.mean(list(aurocs.values()))), "auroc": aurocs}}
    if uses_text:
        proj = nn.Linear(text_tower.width, config.embed_dim)
        proj.load_state_dict({"weight": heads["tower.text_proj.weight"], "bias": heads["tower.text_proj.bias"]})
        images = F.normalize(tower.image_proj(torch.from_numpy(x_five * std + mean).float()), dim=-1)
        prompts = load_prompts("chexpert5")
        class_emb = torch.stack([F.normalize(proj(text_tower(prompts[name])), dim=-1).mean(0) for name in classes])
        zero = (images @ F.normalize(class_emb, dim=-1).t()).argmax(1).numpy()
        reports = F.normalize(proj(text_tower.embed_all([r.text for r in five_records])), dim=-1)
        best = (images @ reports.t()).argmax(1).numpy()
        results["zeroshot_accuracy"] = float((zero == targets).mean())
        results["i2t_precision_at_1"] = float((targets[best] == targets).mean())
    (out / RUN / "results.json").write_text(json.dumps(results, indent=1))
    return results
