"""The demo's reconstruction PSNR and final ITM figures for stage-1 runs trained outside the demo.

    python benchmarks/stage1_figures.py --data runs/demo/data RUN [RUN ...]

For each run folder: held-out reconstruction PSNR on the first `--limit` test images and the ITM loss /
in-batch accuracy of the last three training log windows, computed exactly as `medunifier demo` computes
them for its own run (`demo.reconstruction_psnr`, `demo.final_itm`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medunifier.demo import final_itm, reconstruction_psnr
from medunifier.model.medunifier import MedUnifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="stage-1 run folders (model/ and metrics.jsonl)")
    parser.add_argument("--data", type=Path, required=True, help="the demo's data folder (manifest.jsonl)")
    parser.add_argument("--limit", type=int, default=200, help="test images for PSNR (the demo's eval limit)")
    args = parser.parse_args()
    for run in args.runs:
        model = MedUnifier.from_pretrained(run / "model").eval()
        psnr = reconstruction_psnr(model, args.data, args.limit)
        itm = final_itm(run)
        print(f"{run}: PSNR {psnr['psnr_db_mean']:.2f} dB ({psnr['images']} images), "
              f"ITM {itm['loss']:.3f} / {itm['accuracy']:.3f}", flush=True)


if __name__ == "__main__":
    main()
