"""Stage 1 of a finished demo again with config overrides, then its priors and all of the demo's evaluations.

    python benchmarks/demo_variant.py --demo runs/demo --out runs/variant generator.pixel_channels=64

Reuses the demo folder's data, stage-0 backbone, feature cache and stage-1 config (`DEMO/run/config.yaml`),
so only the overridden settings (and stage 1's run-to-run noise) differ from the demo's own run. Trains
stage 1 into OUT (resumed when OUT has checkpoints), refits its decoder for `--decoder-steps` (the demo's
count), trains the priors for `--prior-steps` (the demo's count by default), then runs the demo's retrieval,
zero-shot, report, reconstruction and synthesis evaluations, writes OUT/results.json and prints one line of
the headline figures. `--priors-only` skips stage 1 and refits the decoder and trains the priors of a stage 1
already in OUT (another prior budget for the same model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medunifier.config import load_config
from medunifier.demo import DEMO_DECODER_STEPS, DEMO_STEPS, evaluate_understanding, final_itm
from medunifier.demo_generation import demo_generation_section, refine_demo_decoder, train_demo_priors
from medunifier.model import load_model
from medunifier.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value settings over the demo's stage-1 config")
    parser.add_argument("--demo", type=Path, required=True, help="a finished `medunifier demo --out` folder")
    parser.add_argument("--out", type=Path, required=True, help="the new stage-1 run folder")
    parser.add_argument("--prior-steps", type=int, default=DEMO_STEPS["prior"])
    parser.add_argument("--decoder-steps", type=int, default=DEMO_DECODER_STEPS,
                        help="steps refitting the decoder on the frozen codes before the priors (0: skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the priors and the synthesis evaluation")
    parser.add_argument("--priors-only", action="store_true",
                        help="OUT already holds a trained stage 1 (e.g. a copy of another run's model/ and "
                             "config.yaml): train only its priors, then evaluate; takes no overrides")
    args = parser.parse_args()
    data = args.demo / "data"
    if args.priors_only:
        if args.overrides or not (args.out / "model").is_dir():
            parser.error("--priors-only takes no overrides and needs OUT/model from a trained stage 1")
    else:
        config = load_config(args.demo / "run" / "config.yaml", args.overrides)
        train(config, data / "manifest.jsonl", args.out, resume=(args.out / "checkpoints").exists())
    refine_demo_decoder(args.out, data / "manifest.jsonl", args.decoder_steps, seed=args.seed)
    train_demo_priors(args.out, data / "manifest.jsonl", seed=args.seed, steps=args.prior_steps)
    model = load_model(args.out / "model")
    results = evaluate_understanding(model, data, args.out / "eval", 200)
    results["itm"] = final_itm(args.out)
    _, results["synthesis"] = demo_generation_section(args.out, data, seed=args.seed)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    synthesis = results["synthesis"]
    print(json.dumps({
        "zeroshot": results["zeroshot"]["accuracy"],
        "i2t_p@1": results["retrieval"]["image_to_text"]["precision_at_k"][1],
        "t2i_p@1": results["retrieval"]["text_to_image"]["precision_at_k"][1],
        "report_f1_micro": results["report"]["clinical_efficacy"]["micro"]["f1"],
        "psnr_db": results["reconstruction"]["psnr_db_mean"],
        "itm": results["itm"],
        "consistency": synthesis["consistency"]["macro"],
        "reconstruction_consistency": synthesis["classifier"]["reconstruction_reference"]["macro"],
        "prior_val_loss": synthesis["prior"]["val_loss"],
    }))


if __name__ == "__main__":
    main()
