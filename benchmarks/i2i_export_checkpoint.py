"""Save a training checkpoint of a run as a model folder, to evaluate a run part-way:

    python benchmarks/i2i_export_checkpoint.py RUN/checkpoints/step-000100 OUT_MODEL_DIR

The model is built from RUN/config.yaml and loads the checkpoint's weights strictly (safetensors only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_model

from medunifier.config import load_config
from medunifier.model.medunifier import MedUnifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args()
    checkpoint = Path(args.checkpoint)
    model = MedUnifier(load_config(checkpoint.parent.parent / "config.yaml"))
    load_model(model, str(checkpoint / "model.safetensors"), strict=True)
    print(f"wrote {model.save_pretrained(args.out)}")


if __name__ == "__main__":
    main()
