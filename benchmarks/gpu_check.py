"""One-command GPU check: CUDA, CPU/GPU agreement, and the paper preset's speed and memory (< 8 min on one GPU).

  1. CUDA: device, capability, bf16 support, a matrix product that agrees with the CPU's.
  2. `tiny`: the same model (same seed, same initial weights) and the same 20 random batches trained for
     `--tiny-steps` steps on the CPU and on the GPU, both in float32 (TF32 off); the losses must agree within
     bf16 tolerance (relative 2e-2). ITM draws its hard negatives from the CPU generator on both, so that the
     two runs draw the same negatives.
  3. Cached features (the frozen-feature path: `vision.frozen` with `vision.cache_features`, the in-memory
     cache), on the CPU with `tiny_frozen`: a training step that reads the vision features from the warm
     cache gives exactly the loss of the same step computed through the frozen tower.
  4. `paper` (random init, nothing loaded): bf16 autocast, batch `--paper-batch`, three variants: without
     and with `train.gradient_checkpointing`, and with cached features (`vision.cache_features=true`; the
     two warm-up steps fill the cache, the timed steps read every sample's tower output from it). Each
     reports median step time, samples/s, peak GPU memory, FLOPs per step (`torch.utils.flop_counter`,
     forward + backward; checkpointing's recomputation not counted, a cached step's skipped tower not
     counted), achieved FLOP/s and MFU against a measured bf16 matmul peak. Then report decoding tokens/s
     with the KV cache (greedy, every report `--decode-tokens` long).

On a machine without CUDA it runs parts 2 (CPU side) and 3 and, with `--paper-flops-cpu`, counts the paper
preset's FLOPs per training sample on the CPU, through the tower and from cached features (batch 2;
several minutes, ~8 GB), then says what it skipped.

    python benchmarks/gpu_check.py [--tiny-steps 20] [--paper-batch 32] [--paper-steps 5] [--paper-flops-cpu]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import medunifier.model.losses as losses_module
from medunifier.config import load_config
from medunifier.model.medunifier import MedUnifier
from medunifier.train.compute import enable_gradient_checkpointing
from medunifier.train.optim import build_optimizer

TEXTS = ["no acute cardiopulmonary process", "small left pleural effusion", "mild cardiomegaly without edema",
         "right lower lobe consolidation concerning for pneumonia", "clear lungs, normal heart size",
         "interval increase in bilateral pleural effusions", "no pneumothorax", "stable mediastinal contours"]
BF16_TOLERANCE = 2e-2


def say(message: str) -> None:
    print(message, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(model: MedUnifier, n: int, batch_size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    c = model.config.image
    batches = []
    for step in range(n):
        texts = [TEXTS[int(i)] for i in torch.randint(len(TEXTS), (batch_size,), generator=g)]
        batch = model.tokenize(texts)
        batch["pixel_values"] = torch.randn(batch_size, c.channels, c.size, c.size, generator=g)
        batch["ids"] = [f"b{step}-{i}" for i in range(batch_size)]
        batches.append(batch)
    return batches


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def cpu_drawn_negatives() -> None:
    """ITM hard negatives from the CPU generator on any device, so CPU and GPU runs draw the same ones."""
    draw = losses_module.sample_hard_negatives

    def on_cpu(sim, forbidden, generator=None):
        return draw(sim.float().cpu(), forbidden.cpu(), generator).to(sim.device)

    losses_module.sample_hard_negatives = on_cpu


def train_losses(model: MedUnifier, batches: list[dict], device: torch.device, seed: int = 0) -> list[float]:
    model = model.to(device).train()
    optimizer = build_optimizer(model, 1e-4, 0.05)
    losses = []
    torch.manual_seed(seed)
    for batch in batches:
        out = model(to_device(batch, device))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return losses


def check_cuda() -> torch.device | None:
    if not torch.cuda.is_available():
        say(f"1. CUDA: not available (torch {torch.__version__}) -> GPU parts skipped")
        return None
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    a, b = torch.randn(512, 512, dtype=torch.float64), torch.randn(512, 512, dtype=torch.float64)
    err = float((a.to(device) @ b.to(device)).cpu().sub(a @ b).abs().max())
    say(f"1. CUDA: {props.name}, capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
        f"bf16 {torch.cuda.is_bf16_supported()}, float64 matmul vs CPU max error {err:.1e}")
    assert err < 1e-9, "the GPU's float64 matrix product disagrees with the CPU's"
    return device


def check_tiny(device: torch.device | None, steps: int) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = MedUnifier(load_config("tiny"))
    batches = make_batches(model, steps, model.config.train.batch_size)
    start = time.perf_counter()
    cpu = train_losses(copy.deepcopy(model), batches, torch.device("cpu"))
    say(f"2. tiny, {steps} steps, batch {model.config.train.batch_size}, CPU float32: {time.perf_counter() - start:.1f} s, "
        f"loss {cpu[0]:.4f} -> {cpu[-1]:.4f}")
    if device is None:
        say("   GPU run skipped (no CUDA)")
        return
    start = time.perf_counter()
    gpu = train_losses(copy.deepcopy(model), batches, device)
    rel = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(cpu, gpu))
    say(f"   GPU float32: {time.perf_counter() - start:.1f} s, loss {gpu[0]:.4f} -> {gpu[-1]:.4f}, "
        f"largest relative loss difference {rel:.2e} (bf16 tolerance {BF16_TOLERANCE})")
    say("   per step CPU / GPU: " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(cpu, gpu)))
    assert rel < BF16_TOLERANCE, "CPU and GPU training diverge beyond bf16 tolerance"


def check_cached_features(steps: int = 3, batch_size: int = 8) -> None:
    """The frozen-feature path on the CPU: a step from the warm cache gives the loss of the step through the tower."""
    torch.manual_seed(0)
    model = MedUnifier(load_config("tiny_frozen", ["vision.cache_features=true"])).train()
    cache = model.vision.feature_cache
    batches = make_batches(model, steps, batch_size, seed=1)

    def step_loss(batch: dict) -> float:
        torch.manual_seed(0)  # the same dropout masks and ITM negatives for both passes
        out = model(batch)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return out.loss.item()

    start = time.perf_counter()
    diff = 0.0
    for batch in batches:
        # a training forward moves the codebooks (k-means init, EMA): both passes start from the same state
        state = copy.deepcopy(model.state_dict())
        cold = step_loss(batch)  # every sample misses: computed through the tower, then stored
        model.load_state_dict(state)
        diff = max(diff, abs(step_loss(batch) - cold))  # every sample hits
    say(f"3. cached features, tiny_frozen on the CPU ({steps} batches of {batch_size}, "
        f"{time.perf_counter() - start:.1f} s): {cache.misses} misses then {cache.hits} hits, {len(cache)} entries "
        f"({cache.num_bytes / 2**20:.1f} MiB); largest loss difference, from the cache vs through the frozen "
        f"tower: {diff:.1e}")
    assert cache.hits == cache.misses == steps * batch_size, "the cache missed a warm sample"
    assert diff == 0.0, "a step from cached features differs from the same step through the frozen tower"


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    """Measured dense bf16 matmul FLOP/s on `device`."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def step_flops(model: MedUnifier, batch: dict, device: torch.device) -> int:
    """FLOPs of one training step's forward and backward (matrix products, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16):
        model(batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def paper_model(device: torch.device, overrides: list[str] | None = None) -> MedUnifier:
    torch.manual_seed(0)
    with torch.device(device):
        return MedUnifier(load_config("paper", overrides or []))


def timed_steps(model: MedUnifier, batches: list[dict], optimizer: torch.optim.Optimizer, steps: int,
                device: torch.device) -> tuple[float, float]:
    """(median step seconds, peak GPU memory in GiB) of `steps` bf16 training steps after two warm-up steps
    (k-means codebook init, kernel selection; with a feature cache, filling it)."""
    model.train()
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 2):
        sync(device)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batches[i % 2])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated(device) / 2**30


def say_variant(label: str, step: float, memory: float, flops: int, batch_size: int, peak: float,
                note: str) -> None:
    say(f"   {label}: step {step * 1e3:.0f} ms, {batch_size / step:.1f} samples/s, peak memory {memory:.1f} GiB, "
        f"{flops / 1e12:.2f} TFLOP/step ({flops / batch_size / 1e9:.0f} GFLOP/sample, {note}), achieved "
        f"{flops / step / 1e12:.0f} TFLOP/s, MFU {flops / step / peak:.1%}")


def check_paper(device: torch.device, batch_size: int, steps: int, decode_tokens: int) -> None:
    peak = matmul_peak(device)
    say(f"4. paper preset (random init), bf16 autocast, batch {batch_size}; measured bf16 matmul peak "
        f"{peak / 1e12:.0f} TFLOP/s")
    model = paper_model(device)
    say(f"   parameters {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M, trainable "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.0f} M")
    batches = [to_device(b, device) for b in make_batches(model, 2, batch_size)]
    optimizer = build_optimizer(model, 1e-4, 0.05)
    step, memory = timed_steps(model, batches, optimizer, steps, device)
    flops = step_flops(model, batches[0], device)  # model FLOPs: the same with checkpointing on
    say_variant("gradient checkpointing off", step, memory, flops, batch_size, peak, "through the frozen tower")
    enable_gradient_checkpointing(model)
    step, memory = timed_steps(model, batches, optimizer, steps, device)
    say_variant("gradient checkpointing on", step, memory, flops, batch_size, peak, "without recomputation")
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()

    # the frozen-feature path: the same weights (same seed), the tower's outputs kept in the in-memory cache
    model = paper_model(device, ["vision.cache_features=true"])
    optimizer = build_optimizer(model, 1e-4, 0.05)
    step, memory = timed_steps(model, batches, optimizer, steps, device)
    cache = model.vision.feature_cache
    flops = step_flops(model, batches[0], device)  # a warm-cache step: the tower does not run
    say_variant("cached features", step, memory, flops, batch_size, peak, "tower skipped")
    say(f"   feature cache: {len(cache)} entries, {cache.num_bytes / 2**20:.0f} MiB on the CPU, {cache.hits} hits, "
        f"{cache.misses} misses (the warm-up steps)")
    assert cache.misses == 2 * batch_size, "a timed step missed the feature cache"
    check_decoding(model, batches[0]["pixel_values"], batch_size, decode_tokens, device)  # through the tower


def check_decoding(model: MedUnifier, pixels: torch.Tensor, batch_size: int, decode_tokens: int,
                   device: torch.device) -> None:
    """Report decoding tokens/s: greedy, every report `decode_tokens` long, with the KV cache."""
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.generate_report(pixels[:2], num_beams=1, max_length=8, min_length=8)  # warm-up
        sync(device)
        start = time.perf_counter()
        model.generate_report(pixels, num_beams=1, max_length=decode_tokens, min_length=decode_tokens)
        sync(device)
    elapsed = time.perf_counter() - start
    say(f"   report decoding (KV cache, greedy, batch {batch_size} x {decode_tokens} tokens): "
        f"{batch_size * decode_tokens / elapsed:.0f} tokens/s")


def paper_flops_cpu() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    model = paper_model(torch.device("cpu"), ["vision.cache_features=true"]).train()
    batch = make_batches(model, 1, 2)[0]
    flops = step_flops(model, batch, torch.device("cpu"))  # a cold cache: through the tower, filling it
    cached = step_flops(model, batch, torch.device("cpu"))  # a warm cache: the tower does not run
    say(f"4. paper preset FLOPs on the CPU (batch 2, bf16 autocast, {time.perf_counter() - start:.0f} s): "
        f"{flops / 2 / 1e9:.0f} GFLOP per training sample (forward + backward, frozen vision tower forward only), "
        f"{cached / 2 / 1e9:.0f} GFLOP from cached features")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-steps", type=int, default=20)
    parser.add_argument("--paper-batch", type=int, default=32)
    parser.add_argument("--paper-steps", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=95)
    parser.add_argument("--paper-flops-cpu", action="store_true", help="without CUDA: count the paper FLOPs on the CPU")
    args = parser.parse_args()
    start = time.perf_counter()
    cpu_drawn_negatives()
    device = check_cuda()
    check_tiny(device, args.tiny_steps)
    check_cached_features()
    if device is not None:
        check_paper(device, args.paper_batch, args.paper_steps, args.decode_tokens)
    else:
        if args.paper_flops_cpu:
            paper_flops_cpu()
        say("skipped without CUDA: the GPU tiny run and its CPU/GPU loss comparison; the paper preset at batch "
            f"{args.paper_batch} in bf16 without and with gradient checkpointing and with cached features (step "
            "time, samples/s, peak memory, achieved FLOP/s and MFU against the measured bf16 matmul peak); "
            "report decoding tokens/s with the KV cache"
            + ("" if args.paper_flops_cpu else "; the paper preset's FLOP count (run with --paper-flops-cpu)"))
    say(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
