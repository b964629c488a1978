"""Write a random-init frozen backbone of `tiny_frozen`'s shape (a stand-in for a stage-0 folder).

    python benchmarks/i2i_random_backbone.py OUT [--seed 0]

Used by the image-to-image budget run (docs/results.md) when the CPU budget leaves no room for stage 0:
the image-to-image head reads the source pixels directly, the frozen features only condition it.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from medunifier.config import load_config
from medunifier.model.vision import _backbone_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = load_config("tiny_frozen")
    torch.manual_seed(args.seed)
    transformers.ResNetModel(_backbone_config(cfg.vision, cfg.image)).save_pretrained(args.out)
    print(f"wrote a random {cfg.vision.backbone} backbone to {args.out}")


if __name__ == "__main__":
    main()
