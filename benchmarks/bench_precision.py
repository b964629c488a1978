"""Training-step time of the `tiny` preset in float32, in bf16 autocast, and in bf16 with a bf16 attention core.

    python benchmarks/bench_precision.py --data DIR/manifest.jsonl [--threads 2] [--repeats 5] [--per-objective]
        [--force-bf16] [--profile] [overrides ...]

One fixed batch of real SynthCXR pairs (the manifest's `tokenizer/` folder is used when present); forward,
backward and an AdamW step per repeat; the median after one warm-up repeat. `train.mixed_precision: auto`
trains in bf16 where the CPU has AVX512-BF16 or AMX, and the encoder runs the CPU attention core in float32
under bf16 (`model.encoder.attention_core`); the third column shows what that saves. On a CPU without
native bf16 the bf16 columns are left out (emulated bf16 is what `auto` never picks, and on an AVX2-only
CPU this script did not finish its bf16 rows in 27 minutes) unless `--force-bf16`. `--per-objective` adds one
row per objective alone, each with the vision encoder's forward and backward; `--profile` prints the
`torch.profiler` operator table of two float32 steps of all four objectives, to show where a step's time goes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medunifier.config import LossWeights, load_config
from medunifier.model import encoder as encoder_module
from medunifier.model.medunifier import MedUnifier
from medunifier.train.overfit import fixed_batch
from medunifier.train.precision import native_bf16

STEPS = {"align (ITC+ITG+TIG)": LossWeights(itc=1, itm=0, itg=1, tig=1),
         "all four": LossWeights(itc=1, itm=1, itg=1, tig=1)}
OBJECTIVES = {name: LossWeights(**{o: float(o == name) for o in ("itc", "itm", "itg", "tig")})
              for name in ("itc", "itm", "itg", "tig")}


def bf16_attention(q, k, v, mask, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-objective", action="store_true", help="also time each objective alone")
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even where the CPU emulates it")
    parser.add_argument("--profile", action="store_true", help="print the operator table of two float32 steps")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    tokenizer = args.data.parent / "tokenizer"
    if tokenizer.is_dir() and not any(o.startswith("text.tokenizer=") for o in overrides):
        overrides.insert(0, f"text.tokenizer={tokenizer}")
    config = load_config("tiny", overrides)
    torch.manual_seed(0)
    model = MedUnifier(config).train()
    batch = fixed_batch(config, args.data, config.train.batch_size, model.tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    float32_attention = encoder_module.attention_core
    bf16 = native_bf16("cpu") or args.force_bf16
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        print(f"2048x2048 matmul, {str(dtype).split('.')[1]}: {10 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9:.0f} GFLOP/s")
    print(f"native bf16 on this CPU: {native_bf16('cpu')}; batch {config.train.batch_size}, "
          f"{args.threads} threads; seconds per step (median of {args.repeats - 1}), forward alone in brackets")
    columns = [(False, float32_attention), (True, float32_attention), (True, bf16_attention)][:3 if bf16 else 1]
    header = [f"{'float32':>16s}", f"{'bf16':>16s}", f"{'bf16 + bf16 attention':>22s}"][:len(columns)]
    print(f"{'step':22s} " + " ".join(header))
    steps = dict(STEPS, **({f"{name} alone": w for name, w in OBJECTIVES.items()} if args.per_objective else {}))
    for name, weights in steps.items():
        row = []
        for amp, attention in columns:
            encoder_module.attention_core = attention
            times, forward_times = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = model(batch, loss_weights=weights).loss
                forward_times.append(time.perf_counter() - start)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times.append(time.perf_counter() - start)
            row.append(f"{statistics.median(times[1:]):.3f} ({statistics.median(forward_times[1:]):.3f})")
        encoder_module.attention_core = float32_attention
        print(f"{name:22s} " + " ".join(f"{cell:>{len(h)}s}" for cell, h in zip(row, header)))
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(2):
                model(batch, loss_weights=STEPS["all four"]).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
