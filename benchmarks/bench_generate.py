"""Image-prior sampling time per image: masked (parallel decoding) vs autoregressive with / without KV cache.

Samples the (top, bottom) code maps of one image with each decoding family, at batch 1 and 16, with
randomly initialised priors of the tiny preset's size (timing does not depend on the weights): top 8x8,
bottom 16x16, codebook 256, width 256, 4 layers, 4 heads, text features [B, 32, 256]. Classifier-free
guidance (2B rows per forward) is on by default, as in real sampling. Prints one table and the ratios
taken in this run. Targets: masked >= 10x faster than cached AR at batch 1; cached >= 5x faster
than uncached.

End to end (`--end-to-end`, on by default): time per image of the whole text-to-image path of a randomly
initialised `tiny` MedUnifier with such priors (`Synthesizer.synthesize`: report -> text encoder -> top and
bottom priors -> VQ decoder -> image), at the same batch sizes, for the masked prior and the cached AR prior.

    python benchmarks/bench_generate.py [--device cuda] [--steps 8] [--guidance 3.0] [--no-end-to-end]
"""

from __future__ import annotations

import argparse
import time

import torch

from medunifier.generate.priors import HierarchicalPrior, PriorConfig, SampleOptions


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_image(model: HierarchicalPrior, batch: int, args: argparse.Namespace, use_cache: bool) -> float:
    device = torch.device(args.device)
    text = torch.randn(batch, args.text_len, args.text_width, device=device)
    mask = torch.ones(batch, args.text_len, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    options = SampleOptions(guidance=args.guidance, steps=args.steps, use_cache=use_cache)
    times = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        top, bottom = model.sample_codes(text, mask, options=options, generator=generator)
        sync(device)
        times.append(time.perf_counter() - start)
        assert top.shape == (batch, args.top, args.top) and bottom.shape == (batch, args.bottom, args.bottom)
    return min(times) / batch


def time_end_to_end(synth, batch: int, args: argparse.Namespace) -> float:
    """Seconds per image of Synthesizer.synthesize (text encoding + both priors + decoding), best of repeats."""
    device = torch.device(args.device)
    texts = ["FINDINGS: Moderate right pleural effusion. Enlarged cardiac silhouette. IMPRESSION: Effusion."] * batch
    times = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        images = synth.synthesize(texts, 1, guidance=args.guidance, steps=args.steps, seed=0)
        sync(device)
        times.append(time.perf_counter() - start)
        assert images.shape[0] == batch
    return min(times) / batch


def end_to_end(args: argparse.Namespace) -> None:
    from medunifier.config import load_config
    from medunifier.generate.sampling import Synthesizer
    from medunifier.generate.train_prior import prior_config
    from medunifier.model.medunifier import MedUnifier

    torch.manual_seed(0)
    config = load_config("tiny")
    model = MedUnifier(config).to(args.device).eval()
    print(f"\nend to end (tiny MedUnifier: {config.image.size}x{config.image.size} images; text encoder + priors + "
          f"decoder), guidance={args.guidance}")
    print(f"{'method':<26}" + "".join(f"{f'batch {b} (ms/img)':>20}" for b in args.batch_sizes))
    for kind, label in (("masked", f"masked ({args.steps} steps/level)"), ("autoregressive", "AR + KV cache")):
        settings = config.prior.model_copy(update={"kind": kind, "width": args.width, "layers": args.layers,
                                                   "heads": args.heads, "steps": args.steps})
        prior = HierarchicalPrior(prior_config(config, settings)).to(args.device).eval()
        synth = Synthesizer(model, prior)
        time_end_to_end(synth, 1, argparse.Namespace(**{**vars(args), "repeats": 1}))  # warm-up
        row = f"{label:<26}"
        for batch in args.batch_sizes:
            row += f"{time_end_to_end(synth, batch, args) * 1e3:>20.2f}"
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=8, help="masked prior: decoding steps per level")
    parser.add_argument("--guidance", type=float, default=3.0, help="1.0 = no classifier-free guidance")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timed runs (after one warm-up)")
    parser.add_argument("--codebook", type=int, default=256)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--bottom", type=int, default=16)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-width", type=int, default=256)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=True,
                        help="also time text -> image with a tiny MedUnifier (prior + decoder)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    models = {}
    for kind in ("masked", "autoregressive"):
        config = PriorConfig(
            kind=kind, codebook_size=args.codebook, top_size=args.top, bottom_size=args.bottom,
            text_width=args.text_width, width=args.width, layers=args.layers, heads=args.heads, steps=args.steps,
        )  # fmt: skip
        models[kind] = HierarchicalPrior(config).to(device).eval()
    methods = {
        f"masked ({args.steps} steps/level)": (models["masked"], True),
        "AR + KV cache": (models["autoregressive"], True),
        "AR, no cache": (models["autoregressive"], False),
    }
    print(
        f"device={device} threads={torch.get_num_threads()} guidance={args.guidance} "
        f"top={args.top}x{args.top} bottom={args.bottom}x{args.bottom} V={args.codebook} "
        f"width={args.width} layers={args.layers}"
    )
    for model, use_cache in methods.values():  # warm-up (allocator, kernels)
        time_per_image(model, 1, argparse.Namespace(**{**vars(args), "repeats": 1}), use_cache)

    results: dict[tuple[str, int], float] = {}
    print(f"{'method':<26}" + "".join(f"{f'batch {b} (ms/img)':>20}" for b in args.batch_sizes))
    for name, (model, use_cache) in methods.items():
        row = f"{name:<26}"
        for batch in args.batch_sizes:
            results[name, batch] = time_per_image(model, batch, args, use_cache)
            row += f"{results[name, batch] * 1e3:>20.2f}"
        print(row, flush=True)

    masked, cached, uncached = methods
    for batch in args.batch_sizes:
        r1 = results[cached, batch] / results[masked, batch]
        r2 = results[uncached, batch] / results[cached, batch]
        print(
            f"batch {batch}: masked vs cached AR: {r1:.1f}x faster   cached vs uncached AR: {r2:.1f}x faster"
        )
    if 1 in args.batch_sizes:
        ok1 = results[cached, 1] / results[masked, 1] >= 10
        ok2 = results[uncached, 1] / results[cached, 1] >= 5
        print(f"targets at batch 1: masked >= 10x cached: {'PASS' if ok1 else 'FAIL'}; "
              f"cached >= 5x uncached: {'PASS' if ok2 else 'FAIL'}")  # fmt: skip
    if args.end_to_end:
        end_to_end(args)


if __name__ == "__main__":
    main()
