"""SynthCXR generation throughput: images/s and total time for 10,000 images at 128x128.

Writes a full dataset (PNGs + manifest) with all CPU cores, as `medunifier data synth` does,
then prints the figures. The target is 10,000 images of 128x128 in under 60 s on 2 cores.

    python benchmarks/bench_synthcxr.py [--n 10000] [--size 128] [--workers N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from medunifier.data.synthcxr import write_synthcxr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one, removed)")
    parser.add_argument("--with-5x200", action="store_true", help="also write the 1,000-image 5x200 set")
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_synthcxr_", dir=os.environ.get("BENCH_TMPDIR")))
    try:
        cpu_before = _cpu_seconds()
        start = time.perf_counter()
        write_synthcxr(out, n=args.n, size=args.size, seed=args.seed, workers=args.workers,
                       per_class_5x200=200 if args.with_5x200 else 0)
        seconds = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_before
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    total = args.n + (1000 if args.with_5x200 else 0)
    print(f"synthcxr: {total} images of {args.size}x{args.size} with {args.workers} workers "
          f"in {seconds:.1f} s = {total / seconds:.0f} images/s (target: 10,000 @128 in < 60 s)")
    # on a shared machine the wall time includes waiting for other processes; the CPU time does not
    print(f"cpu time (all processes): {cpu:.1f} s = {1000 * cpu / total:.2f} ms/image; "
          f"on {args.workers} idle cores: ~{cpu / args.workers:.1f} s")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def _cpu_seconds() -> float:
    """User + system time of this process and its finished children (the worker pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
