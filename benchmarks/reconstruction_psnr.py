"""PSNR of held-out test images reconstructed by a trained run (the demo's measure, on any run folder).

    python benchmarks/reconstruction_psnr.py --run RUN_DIR --data DATA_DIR [--n 200] [--continuous]

DATA_DIR holds `manifest.jsonl` (its test split is used, the first N images) as written by
`medunifier data synth`; RUN_DIR is a `medunifier pretrain` output (its `model/`). `--continuous` also
decodes the adapters' latents without quantising them: the gap to the quantised PSNR is what the two
codebooks cost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from medunifier.demo import _test_batch, reconstruction_psnr
from medunifier.model import load_model
from medunifier.utils import psnr_normalised as psnr


@torch.no_grad()
def continuous_psnr(model, data_dir: Path, n: int) -> float:
    """Mean PSNR when the decoder gets the unquantised top and bottom latents (the bottom adapter
    conditioned on the unquantised top)."""
    pixels, records = _test_batch(model, data_dir, n)
    gen, values = model.generator, []
    for i in range(0, len(records), 32):
        chunk = pixels[i:i + 32]
        tokens = model.tokenize([r.text for r in records[i:i + 32]])
        queries, local, text_cls = model._generator_inputs(chunk, tokens["input_ids"], tokens["attention_mask"])
        z_top = gen.top_adapter(queries)
        images = gen.decoder(z_top, gen.bottom_adapter(local, text_cls, z_top))
        values.extend(float(psnr(images[j:j + 1], chunk[j:j + 1], model.config.image.std)) for j in range(len(chunk)))
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--continuous", action="store_true", help="also decode the unquantised latents")
    args = parser.parse_args()
    model = load_model(args.run / "model")
    result = {"run": str(args.run), **reconstruction_psnr(model, args.data, args.n)}
    if args.continuous:
        result["psnr_db_mean_continuous"] = continuous_psnr(model, args.data, args.n)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
