"""Overfit the `tiny` preset on 32 SynthCXR samples and print every loss before/after and the PSNR.

    python benchmarks/overfit_tiny.py --steps 300 [--data DIR] [--every 50] [--threads 2] [overrides ...]

Target: every loss at most half its starting value and reconstruction PSNR above 25 dB.
`--every N` also prints each objective's mean over steps [i, i + 10) every N steps (where a plateau
ends); overrides are config `key=value` pairs (e.g. `losses.tig=0`, `encoder.initializer_range=0.1`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from medunifier.config import load_config
from medunifier.data.manifest import load_records
from medunifier.data.synthcxr import write_synthcxr
from medunifier.data.tokenizer import train_tokenizer
from medunifier.train.overfit import overfit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--data", type=Path, default=None, help="a SynthCXR folder (made when absent)")
    parser.add_argument("--every", type=int, default=0, help="print the loss history every N steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data or Path(tempfile.mkdtemp()) / "synth"
    if not (data / "manifest.jsonl").exists():
        write_synthcxr(data, n=400, size=64, seed=0, per_class_5x200=0)
    if not (data / "tokenizer").is_dir():
        texts = [r.text for r in load_records(data / "manifest.jsonl")]
        train_tokenizer(texts, data / "tokenizer", vocab_size=1000)
    config = load_config("tiny", [f"text.tokenizer={data / 'tokenizer'}", *args.overrides])
    result = overfit(config, data / "manifest.jsonl", n=args.n, steps=args.steps, lr=args.lr)
    print(f"{args.steps} steps on {args.n} samples in {result.seconds:.0f} s")
    print(f"{'loss':8s} {'first':>8s} {'last':>8s} {'ratio':>6s}")
    for name, ratio in result.ratios().items():
        print(f"{name:8s} {result.first[name]:8.4f} {result.last[name]:8.4f} {ratio:6.2f}")
    print(f"reconstruction PSNR: {result.psnr_db:.2f} dB")
    if args.every:
        names = list(result.ratios())
        print(f"{'step':>5s} " + " ".join(f"{n:>7s}" for n in names))
        for i in range(0, args.steps, args.every):
            rows = result.history[i:i + 10]
            print(f"{i:5d} " + " ".join(f"{sum(r[n] for r in rows) / len(rows):7.4f}" for n in names))


if __name__ == "__main__":
    main()
