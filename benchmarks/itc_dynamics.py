"""How ITC leaves (or does not leave) its starting plateau: feature collapse and gradient size per step.

    python benchmarks/itc_dynamics.py --data DIR/manifest.jsonl [--steps 80] [--lr 5e-4] [overrides ...]

Trains a fresh `tiny` model with ITC alone on random batches of 32 training pairs (the pretrain schedule's
warm-up: 5% of `--schedule-steps` from 1e-5, then cosine) and every `--every` steps prints the loss, the
clipped gradient norm, the temperature and three collapse measures over the batch: the mean pairwise
cosine of the projected text [CLS] features (`cos_text`), of the projected query features averaged over
queries (`cos_query`) and of the vision encoder's pooled feature f_cls (`cos_fcls`). A cosine near 1 means
the features no longer depend on the input, so ITC's logits are equal and it sits at ln(batch).
The largest gradient norms by module follow.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from medunifier.config import load_config
from medunifier.data.dataset import Collator, ManifestDataset
from medunifier.data.manifest import load_records
from medunifier.model.medunifier import MedUnifier
from medunifier.train.optim import build_optimizer, warmup_cosine_lr


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over the off-diagonal pairs of the rows of x [B, D]."""
    x = F.normalize(x.float(), dim=-1)
    sim = x @ x.T
    n = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * n - n))


def gradient_norms(model: torch.nn.Module) -> dict[str, float]:
    """Gradient norm by module (the encoder split one level further)."""
    squares: dict[str, float] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "encoder" else parts[0]
        squares[key] = squares.get(key, 0.0) + float(param.grad.pow(2).sum())
    return {k: v**0.5 for k, v in squares.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a manifest with a train split")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--schedule-steps", type=int, default=200, help="length of the cosine schedule")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = [*args.overrides, "losses.itm=0", "losses.itg=0", "losses.tig=0"]
    tokenizer = args.data.parent / "tokenizer"
    if tokenizer.is_dir() and not any(o.startswith("text.tokenizer=") for o in overrides):
        overrides.insert(0, f"text.tokenizer={tokenizer}")
    config = load_config("tiny", overrides)
    model = MedUnifier(config).train()
    records = [r for r in load_records(args.data, splits=["train"]) if r.image]
    c = config.image
    dataset = ManifestDataset(records, root=args.data.parent, image_size=c.size, channels=c.channels, mean=c.mean,
                              std=c.std)
    collate = Collator(model.tokenizer, config.text.max_length)
    optimizer = build_optimizer(model, args.lr, config.train.weight_decay)
    warmup = max(1, round(0.05 * args.schedule_steps))
    draw = random.Random(0)
    print(f"{'step':>4s} {'lr':>7s} {'itc':>6s} {'grad':>7s} {'cos_text':>8s} {'cos_query':>9s} {'cos_fcls':>8s} "
          f"{'temp':>6s}  largest gradients")
    for step in range(args.steps):
        lr = warmup_cosine_lr(step, args.lr, args.schedule_steps, warmup, 1e-5, 0.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = collate([dataset[i] for i in draw.sample(range(len(dataset)), args.batch)])
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        norms = gradient_norms(model)
        total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip or float("inf")))
        if step % args.every == 0:
            with torch.no_grad():
                features = model.image_features(batch["pixel_values"])  # [B, 1+L, Dv]
                query = model.image_proj(model.query_states(features)).mean(dim=1)  # [B, E]
                text = model.text_proj(model.text_states(batch["input_ids"], batch["attention_mask"])[:, 0])
            largest = sorted(norms.items(), key=lambda kv: -kv[1])[:3]
            print(f"{step:4d} {lr:7.1e} {float(out.losses['itc'].detach()):6.3f} {total:7.3f} "
                  f"{mean_pairwise_cosine(text):8.3f} {mean_pairwise_cosine(query):9.3f} "
                  f"{mean_pairwise_cosine(features[:, 0]):8.3f} {float(model.temperature.detach()):6.4f}  "
                  + " ".join(f"{k} {v:.2f}" for k, v in largest), flush=True)
        optimizer.step()


if __name__ == "__main__":
    main()
