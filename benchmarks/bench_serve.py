"""REST service under load: N concurrent clients on loopback for a fixed time.

Starts `medunifier serve` in a subprocess on 127.0.0.1 (a free port), then N client threads each send
requests round-robin over the chosen endpoints until the time is up. Prints, per endpoint, requests,
requests/s, p50/p95/p99 latency and errors; exits 1 if any request failed (non-2xx or transport error).
Without --ckpt it builds a random-init model of the tiny preset (64x64) and a 64-case SynthCXR index
in a temporary folder, so it runs anywhere; timings then depend only on the model's size.
Only loopback is ever contacted; the run is bounded by --seconds (at most 600).

    python benchmarks/bench_serve.py [--ckpt RUN --index INDEX] [--clients 4] [--seconds 20]
                                     [--endpoints health,report,classify,retrieve] [--num-beams 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

ENDPOINTS = ("health", "report", "classify", "retrieve", "synthesize")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_model(work: Path) -> tuple[Path, Path, Path]:
    """A random-init tiny model, a 64-case SynthCXR manifest and its index; returns (run, index, an image)."""
    import torch

    from medunifier.config import load_config
    from medunifier.data.synthcxr import write_synthcxr
    from medunifier.model.medunifier import MedUnifier
    from medunifier.serve.api import model_checksum
    from medunifier.serve.index import build_index

    torch.manual_seed(0)
    model = MedUnifier(load_config("tiny")).eval()
    model.save_pretrained(work / "run" / "model")
    write_synthcxr(work / "data", n=64, size=64, seed=0, workers=1, per_class_5x200=0)
    index = work / "index"
    build_index(model, work / "data" / "manifest.jsonl", index,
                model_meta={"dir": str(work / "run" / "model"), "checksum": model_checksum(work / "run")})
    image = sorted((work / "data" / "images").glob("*.png"))[0]
    return work / "run", index, image


def start_server(run: Path, index: Path | None, port: int, log: Path, threads: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medunifier.cli", "serve", "--ckpt", str(run), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if index is not None:
        cmd += ["--index", str(index)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + log.read_text())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise RuntimeError("server did not start in 120 s:\n" + log.read_text())


def make_request(client: httpx.Client, endpoint: str, image: bytes, args: argparse.Namespace) -> httpx.Response:
    files = {"image": ("query.png", image, "image/png")}
    if endpoint == "health":
        return client.get("/v1/health")
    if endpoint == "report":
        return client.post("/v1/report", files=files, data={"num_beams": str(args.num_beams)})
    if endpoint == "classify":
        return client.post("/v1/classify", files=files)
    if endpoint == "retrieve":
        return client.post("/v1/retrieve", files=files, data={"k": "5"})
    if endpoint == "synthesize":
        return client.post("/v1/synthesize", json={"text": "Moderate cardiomegaly.", "n": 1})
    raise ValueError(endpoint)


def client_loop(worker: int, base: str, endpoints: list[str], image: bytes, args: argparse.Namespace,
                deadline: float, latencies: dict, errors: dict, lock: threading.Lock) -> None:
    i = worker  # clients start at different endpoints
    with httpx.Client(base_url=base, timeout=120) as client:
        while time.monotonic() < deadline:
            endpoint = endpoints[i % len(endpoints)]
            i += 1
            start = time.perf_counter()
            try:
                ok = make_request(client, endpoint, image, args).status_code < 300
            except httpx.HTTPError:
                ok = False
            elapsed = time.perf_counter() - start
            with lock:
                latencies[endpoint].append(elapsed)
                if not ok:
                    errors[endpoint] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="a run folder (default: a random-init tiny model)")
    parser.add_argument("--index", type=Path, help="an index folder (default: with --ckpt none, else built)")
    parser.add_argument("--image", type=Path, help="the query image (default: a SynthCXR image)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of requests not counted")
    parser.add_argument("--endpoints", default="health,report,classify,retrieve")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: torch's choice)")
    args = parser.parse_args()
    endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if not endpoints or any(e not in ENDPOINTS for e in endpoints):
        parser.error(f"--endpoints must be a comma-separated subset of {','.join(ENDPOINTS)}")
    if not 0 < args.seconds <= 600 or not 1 <= args.clients <= 256:
        parser.error("--seconds must be in (0, 600] and --clients in [1, 256]")

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        if args.ckpt is None:
            t0 = time.perf_counter()
            run, index, image_path = prepare_model(work)
            print(f"prepared a random-init tiny model and a {64}-case index in {time.perf_counter() - t0:.1f} s")
        else:
            run, index, image_path = args.ckpt, args.index, args.image
        if image_path is None:
            from medunifier.data.images import save_png

            image_path = work / "query.png"
            save_png(np.random.default_rng(0).random((64, 64)).astype(np.float32), image_path)
        if args.image is not None:
            image_path = args.image
        if index is None and "retrieve" in endpoints:
            endpoints.remove("retrieve")
            print("no --index: retrieve left out")
        image = Path(image_path).read_bytes()
        port = free_port()
        proc = start_server(run, index, port, work / "server.log", args.threads)
        base = f"http://127.0.0.1:{port}"
        try:
            info = httpx.get(f"{base}/v1/model").json()
            lock = threading.Lock()
            for phase, seconds in (("warmup", args.warmup), ("measure", args.seconds)):
                latencies: dict[str, list[float]] = defaultdict(list)
                errors: dict[str, int] = defaultdict(int)
                deadline = time.monotonic() + seconds
                start = time.perf_counter()
                threads = [threading.Thread(target=client_loop, args=(w, base, endpoints, image, args, deadline,
                                                                      latencies, errors, lock))
                           for w in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - start
                if phase == "warmup":
                    continue
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print(f"\nmodel: image {info['image']['size']}px, {info['parameters'] / 1e6:.1f}M parameters, "
          f"device {info['device']}; {args.clients} clients for {wall:.1f} s on loopback "
          f"(CPU cores: {os.cpu_count()}, server torch threads: {args.threads or 'default'})")
    print(f"{'endpoint':<12}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    total = total_errors = 0
    for endpoint in endpoints:
        lat = np.asarray(latencies.get(endpoint, []), dtype=np.float64) * 1000
        n = len(lat)
        total += n
        total_errors += errors.get(endpoint, 0)
        p50, p95, p99 = (np.percentile(lat, [50, 95, 99]) if n else (float("nan"),) * 3)
        print(f"{endpoint:<12}{n:>9}{n / wall:>9.2f}{p50:>9.1f}{p95:>9.1f}{p99:>9.1f}{errors.get(endpoint, 0):>8}")
    print(f"{'all':<12}{total:>9}{total / wall:>9.2f}{'':>27}{total_errors:>8}")
    if total_errors:
        print(f"FAIL: {total_errors} requests failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
