"""How much do the image-text encoder's query outputs depend on the image?

    python benchmarks/query_image_dependence.py --data DIR/manifest.jsonl [--ckpt RUN] [--n 16]

Prints the standard deviation of the query outputs f_q across images (averaged over queries and
channels) next to their spread across queries, and the same for the normalised ITC image
embeddings. Without --ckpt it measures a freshly initialised `tiny` model. A spread across images
near zero means ITC cannot tell images apart (see docs/results.md, "Demo").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medunifier.config import load_config
from medunifier.model.medunifier import MedUnifier
from medunifier.train.overfit import fixed_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True, help="a manifest with a train split")
    parser.add_argument("--ckpt", type=Path, default=None, help="a run folder or saved model (default: fresh tiny)")
    parser.add_argument("--n", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MedUnifier.from_pretrained(args.ckpt) if args.ckpt else MedUnifier(load_config("tiny"))
    model.eval()
    batch = fixed_batch(model.config, args.data, args.n, model.tokenizer)
    with torch.no_grad():
        features = model.image_features(batch["pixel_values"])  # [B, 1+L, Dv]
        queries = model.query_states(features)  # [B, Q, H]
        embeds = model.encode_image(batch["pixel_values"])  # [B, Q, E]
    print(f"vision features: std across images {features.std(0).mean():.4f}")
    print(f"query outputs:   std across images {queries.std(0).mean():.4f}, across queries {queries.std(1).mean():.4f}")
    print(f"ITC image embeddings: std across images {embeds.std(0).mean():.4f}")


if __name__ == "__main__":
    main()
