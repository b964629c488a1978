"""Resumable training checkpoints in safetensors + JSON (never pickle), written atomically.

A checkpoint is a folder `RUN/checkpoints/step-000040/`:

    model.safetensors        model weights and buffers (VQ codebooks and EMA statistics included)
    optimizer.safetensors    every tensor of the optimiser state, keyed `state/<param index>/<name>`
    optimizer.json           the rest of the optimiser state (param groups, non-tensor entries)
    trainer_state.json       step, stage, scheduler, grad scaler, counters (written by the main process)
    rank-<r>.safetensors     torch (and CUDA) RNG states of process r
    rank-<r>.json            python and numpy RNG states and the data position of process r

Every file is written into `checkpoints/.tmp-step-000040/` first; the folder is renamed into place
with `os.replace` once complete, so a crash mid-write never leaves a half checkpoint that
`latest_checkpoint` would pick. A checkpoint damaged later (a full disk, a copy cut short) is caught by
`checkpoint_problem`; `resume_checkpoint` moves it aside to `step-N.damaged` and takes the newest intact one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor, nn

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def _no_barrier() -> None:
    return None


# --------------------------------------------------------------------------------------- optimiser


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into safetensors-ready tensors and a JSON-ready remainder."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    meta = {"param_groups": state_dict["param_groups"], "scalars": scalars}
    return tensors, json.loads(json.dumps(meta))  # tuples -> lists; fails loudly on anything not JSON


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Python, numpy and torch (CPU and every CUDA device) generator states of this process."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np.asarray(np_keys).tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    # by device index: a string sort would put cuda_10 before cuda_2 and give devices each other's state
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ------------------------------------------------------------------------------------ save and load


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    rng_state: tuple[dict[str, Tensor], dict[str, Any]] | None = None,
    *,
    rank: int = 0,
    is_main: bool = True,
    barrier: Callable[[], None] = _no_barrier,
    keep_last: int | None = None,
) -> Path:
    """Write one checkpoint atomically; every process calls this (collectively when distributed).

    `model` is the unwrapped module; `trainer_state` (JSON) is written by the main process and
    `rank_state` (JSON: data position, ...) plus `rng_state` (default: the current RNG states) by
    every process. Older checkpoints beyond `keep_last` are removed afterwards.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = rng_state if rng_state is not None else capture_rng_state()
    save_file(rng_tensors, str(tmp / f"rank-{rank}.safetensors"))
    _write_json(tmp / f"rank-{rank}.json", {"rng": rng_meta, **rank_state})
    if is_main:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", opt_meta)
        _write_json(tmp / TRAINER_STATE, {"step": step, **trainer_state})
    barrier()
    if is_main:
        if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last is not None:
            prune_checkpoints(run_dir, keep_last)
    barrier()
    return final


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    rank: int = 0,
    restore_rng: bool = True,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load weights (strict) and optimiser state into the given objects, restore this process's RNG.

    Returns (trainer_state, rank_state); rank_state is None when the checkpoint has no file for
    this rank (it was written by fewer processes), in which case the RNG is left as it is.
    """
    path = Path(path)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        meta = json.loads((path / "optimizer.json").read_text())
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    rank_json = path / f"rank-{rank}.json"
    if not rank_json.exists():
        return trainer_state, None
    rank_state = json.loads(rank_json.read_text())
    if restore_rng:
        restore_rng_state(load_file(str(path / f"rank-{rank}.safetensors")), rank_state["rng"])
    return trainer_state, rank_state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (accepts the run folder or its checkpoints folder)."""
    root = Path(run_dir)
    if root.name != CHECKPOINTS:
        root = root / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE).exists():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recent complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


MAIN_FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", TRAINER_STATE, "rank-0.safetensors",
              "rank-0.json")
DAMAGED_SUFFIX = ".damaged"


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (missing, header cut or not JSON, data shorter than the header
    says), or None. Reads the header only."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes, no header)"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"{path.name} is truncated (a {length}-byte header in a {size}-byte file)"
            header = json.loads(fh.read(length))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{path.name} has an unreadable header ({type(err).__name__})"
    if not isinstance(header, dict):
        return f"{path.name} has an unreadable header"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and len(v.get("data_offsets", ())) == 2]
    need = 8 + length + max(ends, default=0)
    if size < need:
        return f"{path.name} is truncated ({size} of {need} bytes)"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (its first problem), or None when it looks intact:
    every expected file present, safetensors headers and lengths consistent, JSON files parse."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder"
    for name in MAIN_FILES:
        file = path / name
        if name.endswith(".safetensors"):
            problem = safetensors_problem(file)
            if problem is not None:
                return problem
            continue
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return f"{name} is not valid JSON ({type(err).__name__})"
        if not isinstance(data, dict) or (name == TRAINER_STATE and not isinstance(data.get("step"), int)):
            return f"{name} does not hold the expected fields"
    return None


def resume_checkpoint(run_dir: str | Path, move_aside: bool = True) -> Path | None:
    """The newest intact checkpoint of a run, or None. Each damaged newer one is named on stderr and, with
    `move_aside` (the main process only), renamed to `step-N.damaged` so later runs skip it too."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        message = f"warning: checkpoint {path} is damaged ({problem})"
        if move_aside:
            target = path.with_name(path.name + DAMAGED_SUFFIX)
            n = 1
            while target.exists():
                n += 1
                target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
            try:
                os.replace(path, target)
                message += f": moved aside to {target.name}"
            except OSError as err:
                message += f" and could not be moved aside ({err})"
        print(message + "; trying the next older one", file=sys.stderr, flush=True)
    return None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Remove all but the `keep_last` most recent checkpoints; returns the removed folders."""
    found = list_checkpoints(run_dir)
    removed = found[: max(0, len(found) - keep_last)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
