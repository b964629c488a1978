"""Step time of the four objectives on cached frozen features against the end-to-end `tiny` step.

    python benchmarks/bench_frozen_step.py --data DATA/manifest.jsonl [--batch-size 32] [--steps 8]

Both models see the same real batches (the first `steps` + 1 batches of the train split, their reports and
images), at the same batch size and precision. `tiny` trains its ResNet through the Q-Former (forward and
backward through the vision encoder every step); `tiny_frozen` reads the backbone's outputs from a disk
cache written here by `write_feature_cache` (a randomly initialised backbone of the same shape: its weights
do not change the cost). Prints seconds per step (median over the timed steps, after one warm-up step) and
their ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from medunifier.config import LossWeights, load_config
from medunifier.data.dataset import Collator, ManifestDataset
from medunifier.model.medunifier import MedUnifier
from medunifier.train.features import write_feature_cache
from medunifier.train.precision import autocast


def time_steps(model: MedUnifier, batches: list[dict], precision: str) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    weights = LossWeights(itc=1.0, itm=1.0, itg=1.0, tig=1.0)
    model.train()
    times = []
    for batch in batches:
        start = time.perf_counter()
        with autocast(precision):
            loss = model(batch, loss_weights=weights).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", default=None, help="text.tokenizer for both (default: the presets')")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    common = [f"train.batch_size={args.batch_size}"] + ([f"text.tokenizer={args.tokenizer}"] if args.tokenizer else [])
    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_config("tiny", common)
        vision_dir = Path(tmp) / "vision"
        cfg = transformers.ResNetConfig(num_channels=1, embedding_size=96, hidden_sizes=[96, 192], depths=[2, 2],
                                        layer_type="basic", downsample_in_first_stage=False)
        transformers.ResNetModel(cfg).save_pretrained(str(vision_dir))
        frozen = load_config("tiny_frozen", [*common, f"vision.pretrained={vision_dir}"])
        c = frozen.image
        cache = Path(tmp) / "features"
        start = time.perf_counter()
        write_feature_cache(frozen, args.data, cache, splits=["train"], progress=False)
        print(f"feature cache of the train split written in {time.perf_counter() - start:.1f} s")
        frozen = load_config("tiny_frozen", [*common, f"vision.pretrained={vision_dir}", f"vision.feature_cache={cache}"])
        torch.manual_seed(0)
        models = {"tiny (end to end)": MedUnifier(tiny), "tiny_frozen (cached features)": MedUnifier(frozen)}
        collate = Collator(models["tiny (end to end)"].tokenizer, max_length=tiny.text.max_length)
        data = ManifestDataset(args.data, image_size=c.size, channels=c.channels, mean=c.mean, std=c.std,
                               splits=["train"], hash_images=True)
        batches = [collate([data[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
                   for b in range(args.steps + 1)]
        results = {}
        for name, model in models.items():
            times = time_steps(model, batches, tiny.train.mixed_precision)
            results[name] = statistics.median(times)
            print(f"{name}: {results[name]:.3f} s/step (median of {len(times)}, batch {args.batch_size})")
        cached = models["tiny_frozen (cached features)"].vision.feature_cache
        print(f"cache hits {cached.hits}, misses {cached.misses}")
        a, b = results.values()
        print(f"ratio end-to-end / cached: {a / b:.2f}x")


if __name__ == "__main__":
    main()
