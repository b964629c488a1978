"""How much do the image-text encoder's query outputs depend on the image?

    python benchmarks/query_image_dependence.py --data DIR/manifest.jsonl [--ckpt RUN] [--n 16] [overrides ...]

Prints the standard deviation of the query outputs f_q across images (averaged over queries and
channels) next to their spread across queries, and the same for the normalised ITC image
embeddings. Then, in training mode, it compares that image signal with the dropout noise: the spread
between two passes over the same images with different dropout draws. Without --ckpt it measures a
freshly initialised `tiny` model with the given config overrides, e.g.
`encoder.dropout=0.1 encoder.initializer_range=0.02` (BERT's values). An image signal near zero, or
below the dropout noise, means ITC cannot tell images apart.
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
    parser.add_argument("overrides", nargs="*", help="config overrides for a fresh model (key=value)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.ckpt:
        model = MedUnifier.from_pretrained(args.ckpt)
    else:
        overrides = list(args.overrides)
        tokenizer = args.data.parent / "tokenizer"
        if tokenizer.is_dir() and not any(o.startswith("text.tokenizer=") for o in overrides):
            overrides.insert(0, f"text.tokenizer={tokenizer}")
        model = MedUnifier(load_config("tiny", overrides))
    batch = fixed_batch(model.config, args.data, args.n, model.tokenizer)
    pixels = batch["pixel_values"]
    model.eval()
    with torch.no_grad():
        features = model.image_features(pixels)  # [B, 1+L, Dv]
        queries = model.query_states(features)  # [B, Q, H]
        embeds = model.encode_image(pixels)  # [B, Q, E]
    print(f"vision features: std across images {features.std(0).mean():.4f}")
    print(f"query outputs:   std across images {queries.std(0).mean():.4f}, across queries {queries.std(1).mean():.4f}")
    print(f"ITC image embeddings: std across images {embeds.std(0).mean():.4f}")

    # training mode: BatchNorm on batch statistics as in training; signal without dropout, noise from it
    model.train()
    with torch.no_grad():
        features = model.image_features(pixels)
        model.encoder.eval()
        signal = model.query_states(features).std(0).mean()
        model.encoder.train()
        torch.manual_seed(1)
        first = model.query_states(features)
        torch.manual_seed(2)
        second = model.query_states(features)
    print(f"training mode: image signal {signal:.4f}, dropout noise {(first - second).std():.4f} "
          f"(encoder.dropout={model.config.encoder.dropout}, "
          f"encoder.initializer_range={model.config.encoder.initializer_range})")


if __name__ == "__main__":
    main()
