"""Can the model fit one fixed batch? A probe that separates the query path from the rest.

    python benchmarks/fixed_batch_probe.py --data DIR/manifest.jsonl --probe linear  [overrides ...]
    python benchmarks/fixed_batch_probe.py --data DIR/manifest.jsonl --probe queries [overrides ...]
    python benchmarks/fixed_batch_probe.py --data DIR/manifest.jsonl --probe model --losses itm [overrides ...]

Trains a fresh `tiny` model (with the given config overrides; the manifest's `tokenizer/` folder is used
when present) on the first `--n` training pairs for `--steps` AdamW steps and prints the loss every 10:

* `linear`: ITC between a linear map of the vision encoder's pooled feature f_cls and the text [CLS]
  embedding, bypassing the image-text encoder's query path;
* `queries`: the same ITC (max over queries) through the query path, as the model computes it;
* `model`: the model's own forward with only the objectives in `--losses` switched on.

If `linear` fits and `queries` does not, the query path is what blocks learning.

`--scale PART=FACTOR` (repeatable) multiplies some of the image-text encoder's freshly initialised weights,
to find which part of a larger initialisation lets an objective fit: `self_qk` (self-attention query and
key), `attention_vo` (self- and cross-attention value and output), `cross_qk` (cross-attention query and
key), `ffn` (the text and query feed-forward layers), `linear` (every linear layer of the encoder).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medunifier.config import load_config
from medunifier.model.medunifier import MedUnifier
from medunifier.train.overfit import fixed_batch

SCALABLE_PARTS = ("self_qk", "attention_vo", "cross_qk", "ffn", "linear")


@torch.no_grad()
def scale_encoder_weights(model: MedUnifier, part: str, factor: float) -> int:
    """Multiply the initial weights of one part of the image-text encoder; returns how many tensors changed."""
    if part not in SCALABLE_PARTS:
        raise SystemExit(f"--scale: unknown part {part!r}; choose from {', '.join(SCALABLE_PARTS)}")
    hidden = model.config.encoder.hidden_size
    changed = 0
    for name, module in model.encoder.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        rows: slice | None = None
        if part == "linear" or (part == "ffn" and "_ffn." in name + "."):
            rows = slice(None)
        elif name.endswith("self_attention.qkv"):  # rows: query, key, value
            rows = {"self_qk": slice(0, 2 * hidden), "attention_vo": slice(2 * hidden, None)}.get(part)
        elif name.endswith("cross_attention.query"):
            rows = slice(None) if part == "cross_qk" else None
        elif name.endswith("cross_attention.key_value"):  # rows: key, value
            rows = {"cross_qk": slice(0, hidden), "attention_vo": slice(hidden, None)}.get(part)
        elif name.endswith("attention.out"):
            rows = slice(None) if part == "attention_vo" else None
        if rows is not None:
            module.weight[rows] *= factor
            changed += 1
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a manifest with a train split")
    parser.add_argument("--probe", choices=("linear", "queries", "model"), default="queries")
    parser.add_argument("--losses", default="itc", help="with --probe model: '+'-joined objectives")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", action="append", default=[], metavar="PART=FACTOR",
                        help="multiply part of the encoder's initial weights: " + ", ".join(SCALABLE_PARTS))
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = list(args.overrides)
    tokenizer = args.data.parent / "tokenizer"
    if tokenizer.is_dir() and not any(o.startswith("text.tokenizer=") for o in overrides):
        overrides.insert(0, f"text.tokenizer={tokenizer}")
    if args.probe == "model":
        chosen = set(args.losses.split("+"))
        overrides += [f"losses.{k}={1.0 if k in chosen else 0.0}" for k in ("itc", "itm", "itg", "tig")]
    config = load_config("tiny", overrides)
    model = MedUnifier(config)
    for item in args.scale:
        part, _, factor = item.partition("=")
        print(f"--scale {part}={factor}: {scale_encoder_weights(model, part, float(factor))} weight tensors")
    model.train()
    batch = fixed_batch(config, args.data, args.n, model.tokenizer)
    linear = torch.nn.Linear(model.vision.hidden_size, config.encoder.embed_dim)
    params = [*model.parameters(), *linear.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95))
    targets = torch.arange(args.n)
    start = time.perf_counter()
    for step in range(args.steps):
        if args.probe == "model":
            out = model(batch)
            loss, shown = out.loss, {k: round(float(v.detach()), 3) for k, v in out.losses.items()}
            if "itm_acc" in out.metrics:
                shown["itm_acc"] = round(float(out.metrics["itm_acc"]), 3)
        else:
            features = model.image_features(batch["pixel_values"])  # [B, 1 + L, Dv]
            text = F.normalize(model.text_proj(model.text_states(batch["input_ids"], batch["attention_mask"])[:, 0]), dim=-1)
            if args.probe == "linear":
                sim = F.normalize(linear(features[:, 0]), dim=-1) @ text.T  # [B, B]
            else:
                image = F.normalize(model.image_proj(model.query_states(features)), dim=-1)  # [B, Q, E]
                sim = torch.einsum("bqe,te->bqt", image, text).max(dim=1).values
            sim = sim / config.itc_temperature
            loss = 0.5 * (F.cross_entropy(sim, targets) + F.cross_entropy(sim.T, targets))
            shown = {"itc": round(float(loss.detach()), 3)}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step:4d}  {shown}  {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
