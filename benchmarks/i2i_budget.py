"""The image-to-image budget run behind docs/results.md: train under a CPU-time cap, then `eval i2i`.

    python benchmarks/i2i_budget.py --data DATA/manifest.jsonl --backbone BACKBONE --out RUN [--cpu-minutes 15] \
        [--steps 1200] [KEY=VALUE ...]

Trains `tiny_frozen` with the image-to-image head on the manifest's translate / upscale / segment records
(one stage, "i2i:" keys, equal weights) for `--steps` steps or until the training process has used
`--cpu-minutes` of CPU time (user + system, read from /proc; SIGTERM then makes the trainer checkpoint and
stop, and `--resume --max-steps` at the reached step writes the model). Then runs `medunifier eval i2i`.
KEY=VALUE arguments are config overrides for the training run (e.g. `i2i.image_loss=mse` for an ablation).
Prints every command with its wall time and CPU time and writes RUN/budget.json. The CPU cap, not the wall
clock, is the budget: on a shared machine the wall time is much longer and is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CLOCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK


def run(cmd: list[str], log: Path, cap_s: float | None = None) -> dict:
    """Run `cmd` (output to `log`); with `cap_s`, SIGTERM it once its CPU time reaches the cap."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    before = os.times()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        capped, used = False, 0.0
        while proc.poll() is None:
            try:
                used = cpu_seconds(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            if cap_s is not None and used >= cap_s and not capped:
                proc.send_signal(signal.SIGTERM)
                capped = True
            time.sleep(2)
        proc.wait()
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    result = {"cmd": cmd, "rc": proc.returncode, "wall_s": time.perf_counter() - start, "cpu_s": cpu,
              "capped": capped}
    print(f"  rc {proc.returncode}, wall {result['wall_s']:.0f} s, CPU {cpu:.0f} s" + (" (CPU cap)" if capped else ""),
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", required=True, help="the frozen vision backbone folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--cpu-minutes", type=float, default=15.0)
    parser.add_argument("--max-per-task", type=int, default=300)
    parser.add_argument("overrides", nargs="*", help="config overrides for training, KEY=VALUE")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "medunifier.cli"]
    stage = (f'train.stages=[{{name: i2i, steps: {args.steps}, mixture: {{"i2i:translate": 1, "i2i:upscale": 1, '
             '"i2i:segment": 1}, losses: {itc: 0, itm: 0, itg: 0, tig: 0, i2i: 1}}]')
    common = ["--config", "tiny_frozen", "--data", args.data, "--out", str(out / "run"),
              f"vision.pretrained={args.backbone}", "i2i.enabled=true", stage, "train.val_every=100000",
              "train.save_every=50", "train.log_every=10", *args.overrides]
    steps = [run([*cli, "pretrain", *common], out / "train.log", cap_s=60 * args.cpu_minutes)]
    if not (out / "run" / "model" / "config.json").exists():  # stopped by the cap: write the model as it is
        reached = max(int(p.name.split("-")[1]) for p in (out / "run" / "checkpoints").glob("step-*")
                      if p.name.split("-")[1].isdigit())
        steps.append(run([*cli, "pretrain", *common, "--resume", "--max-steps", str(reached)], out / "finish.log"))
    steps.append(run([*cli, "eval", "i2i", "--ckpt", str(out / "run"), "--data", args.data,
                      "--max-per-task", str(args.max_per_task)], out / "eval.log"))
    (out / "budget.json").write_text(json.dumps({"args": vars(args), "commands": steps}, indent=2))


if __name__ == "__main__":
    main()
