"""Which small vision encoder learns SynthCXR findings from scratch within a CPU budget?

Trains each `tiny`-sized backbone (the ViT and the ResNet of `medunifier.model.vision`, same 8x8 token
grid) with a linear multi-label head on f_cls, BCE on the nine finding labels, batch 32, AdamW, for a
fixed number of steps on the same SynthCXR images, and prints the training loss every 25 steps next
to the loss of the best constant predictor (the label prior). A backbone whose loss stays at the prior
has learned nothing about the findings; the image side of ITC cannot do better.

    python benchmarks/vision_from_scratch.py [--steps 200] [--n 2048] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from medunifier.config import load_config
from medunifier.data.synthcxr import synthesize
from medunifier.model.vision import VisionEncoder, count_parameters

BACKBONES = {"vit": ["vision.backbone=vit", "vision.num_layers=4"], "resnet": ["vision.backbone=resnet"]}


def prior_loss(labels: torch.Tensor) -> float:
    """BCE of predicting each label's training frequency for every image (the best constant predictor)."""
    p = labels.mean(0).clamp(1e-6, 1 - 1e-6)
    return float(F.binary_cross_entropy(p.expand_as(labels), labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--n", type=int, default=2048, help="SynthCXR training images")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = synthesize_tensors(args.n)
    print(f"{args.n} SynthCXR images at 64x64; label-prior BCE {prior_loss(labels):.4f}")
    print("| backbone | parameters | s/step | " + " | ".join(f"step {s}" for s in range(25, args.steps + 1, 25)) + " |")
    for name, overrides in BACKBONES.items():
        config = load_config("tiny", overrides)
        torch.manual_seed(0)
        encoder = VisionEncoder(config.vision, config.image)
        head = torch.nn.Linear(encoder.hidden_size, labels.shape[1])
        params = [*encoder.parameters(), *head.parameters()]
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
        generator = torch.Generator().manual_seed(1)
        losses, window, start = [], [], time.perf_counter()
        encoder.train()
        for step in range(1, args.steps + 1):
            index = torch.randint(len(images), (32,), generator=generator)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, step / 20)
            loss = F.binary_cross_entropy_with_logits(head(encoder(images[index])[:, 0]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            window.append(float(loss.detach()))
            if step % 25 == 0:
                losses.append(sum(window) / len(window))
                window = []
        seconds = (time.perf_counter() - start) / args.steps
        print(f"| {name} | {count_parameters(encoder):,} | {seconds:.2f} | " + " | ".join(f"{x:.4f}" for x in losses) + " |")


def synthesize_tensors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n SynthCXR images normalised as the tiny preset does ([n, 1, 64, 64], mean 0.5, std 0.5) and labels [n, 9]."""
    from medunifier.data.findings import FINDINGS

    arrays, records = synthesize(n, size=64, seed=0)
    images = torch.as_tensor(arrays, dtype=torch.float32)[:, None] / 255.0
    labels = torch.tensor([[float(r["labels"].get(f, 0)) for f in FINDINGS] for r in records])
    return (images - 0.5) / 0.5, labels


if __name__ == "__main__":
    main()
