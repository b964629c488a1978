"""PSNR of held-out test images reconstructed by a trained run (the demo's measure, on any run folder).

    python benchmarks/reconstruction_psnr.py --run RUN_DIR --data DATA_DIR [--n 200]

DATA_DIR holds `manifest.jsonl` (its test split is used, the first N images) as written by
`medunifier data synth`; RUN_DIR is a `medunifier pretrain` output (its `model/`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medunifier.demo import _reconstruction
from medunifier.eval.common import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    model = load_model(args.run / "model")
    print(json.dumps({"run": str(args.run), **_reconstruction(model, args.data, args.n)}))


if __name__ == "__main__":
    main()
