"""Shared versus task-routed experts: `medunifier eval experts`.

The same run with `encoder.experts: shared` (one set of encoder feed-forwards serves understanding and
generation, as in the paper) and `encoder.experts: task` (UniMedVL's task-routed experts: the TIG path
gets its own copies). Per variant and seed, with everything else in the resolved config equal (data,
steps, seed, objectives, prior settings; a shared variant of a base with `expert_attention` also drops
that switch, which needs task experts):

1. pre-training on `data` for `steps` steps (`medunifier.train.loop.train`), timed: seconds per step are
   the trainer's steady-state step time (batch_size x grad_accum / samples_per_s, first log window left
   out), or wall time / steps when no log window was written;
2. understanding: retrieval precision@K and zero-shot classification on `eval_data` (default: the
   `manifest_5x200.jsonl` beside `data`, else the test split of `data`), with the objective ablation's
   helpers (`medunifier.eval.ablation.evaluate_understanding`);
3. generation (`synthesis=True`): a text-conditioned code prior trained for `prior_steps` steps on the
   frozen model (`train_prior`), then `evaluate_synthesis` on about `n_generated` images generated from
   the eval set's reports: finding consistency (macro accuracy of a CNN trained on the real train images
   of `data`; chance 0.20) and FID against as many real reference images (Inception when `fid`, always
   the domain-feature FID). Edits are left out. With ~100 images FID is strongly biased upward: compare
   variants at the same `n_generated`, not with published FIDs;
4. VQA (`vqa_data` given): a second run per variant and seed, on `vqa_data` alone, from scratch, for the
   same `steps` with the same seed, trained with `vqa_objectives` (default ITG + TIG), then `run_vqa` on
   its `vqa_split` (closed questions scored by candidate likelihood, the pool from its train split).
   Why TIG too: with ITG alone no gradient ever reaches the generation experts, which start as copies of
   the understanding ones, so both variants would train bit-identical models and the VQA comparison
   could not differ (`tests/eval/test_experts.py` checks this). With ITG + TIG the shared model answers
   questions with feed-forwards that also serve image generation, the task model does not: that is the
   interference the ablation asks about. (`medunifier.train.loop.train` cannot start from a pre-trained
   run, so the VQA run is not a fine-tune of run 1.)

Each variant's `parameter_report()` (total, encoder, expert copies) is recorded. results.json holds every
run's scalars, mean ± std over seeds per variant and, when both variants ran, the per-seed paired
difference task - shared (same seeds, so seed-to-seed noise partly cancels).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from medunifier.config import ConfigError, MedUnifierConfig, config_from_dict
from medunifier.eval.ablation import (
    StudySettings,
    ablation_config,
    evaluate_understanding,
    parse_objectives,
    summarize_runs,
)
from medunifier.eval.common import load_split, print_table, write_results
from medunifier.eval.metrics import mean_std
from medunifier.eval.zeroshot import load_prompts

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier
    from medunifier.model.protocols import ImageTextModel

VARIANTS = ("shared", "task")
DEFAULT_VQA_OBJECTIVES = ("itg", "tig")
TIMING_FILE = "experts_timing.json"
PARAMETER_KEYS = ("total", "trainable", "encoder", "encoder.understand_experts", "encoder.generate_experts")


def experts_config(
    base: MedUnifierConfig,
    variant: str,
    seed: int,
    steps: int,
    *,
    objectives: Sequence[str] | None = None,
    prior_steps: int | None = None,
) -> MedUnifierConfig:
    """`base` with `encoder.experts = variant`, the seed and a `steps`-step schedule (`ablation_config`);
    `objectives` (default: the base's enabled ones) masks the loss weights as the objective ablation does.
    The prior gets the same seed and `prior_steps` steps and is not trained inside pre-training (this
    runner trains it). The result is validated like a loaded config."""
    if variant not in VARIANTS:
        raise ValueError(f"expert variant must be one of {VARIANTS}, got {variant!r}")
    enabled = list(objectives) if objectives is not None else base.losses.enabled()
    data = ablation_config(base, enabled, seed, steps).to_dict()
    data["encoder"]["experts"] = variant
    if variant == "shared":
        data["encoder"]["expert_attention"] = False  # only defined with task experts
    data["prior"]["seed"] = seed
    data["prior"]["in_pretrain"] = False
    if prior_steps is not None:
        data["prior"]["max_steps"] = prior_steps
    return config_from_dict(data, f"{base.name} with encoder.experts={variant}")


def resolve_eval_data(data: str | Path, eval_data: str | Path | None) -> tuple[Path, str | None]:
    """(manifest, split) for retrieval and zero-shot: `eval_data` whole, else the `manifest_5x200.jsonl`
    beside `data`, else the test split of `data` (an error when it has none: never the training data)."""
    if eval_data is not None:
        return Path(eval_data), None
    beside = Path(data).parent / "manifest_5x200.jsonl"
    if beside.exists():
        return beside, None
    if "test" not in {r.split for r in load_split(data)[0]}:
        raise ValueError(f"{data} has no test split and no manifest_5x200.jsonl beside it: pass eval_data "
                         "(a held-out manifest for retrieval and zero-shot)")
    return Path(data), "test"


def parameter_counts(model: ImageTextModel) -> dict[str, float | None]:
    """`params_*` scalars from the model's parameter_report() (None for a model without one)."""
    report = model.parameter_report() if hasattr(model, "parameter_report") else {}
    return {"params_" + k.replace("encoder.", "enc_"): report.get(k) for k in PARAMETER_KEYS}


def step_seconds(result: Any, config: MedUnifierConfig, wall_s: float, steps: int) -> dict[str, Any]:
    """Training time of one run: steady-state seconds per optimiser step from the trainer's throughput,
    else wall time / steps (which also counts building, validating and saving the model)."""
    samples_per_s = float(getattr(result, "samples_per_s", 0.0) or 0.0)
    per_step = config.train.batch_size * config.train.grad_accum
    if samples_per_s > 0:
        return {"s_per_step": per_step / samples_per_s, "s_per_step_source": "trainer", "train_wall_s": wall_s}
    return {"s_per_step": wall_s / max(1, steps), "s_per_step_source": "wall", "train_wall_s": wall_s}


def _train_timed(train_fn: Callable[..., Any], cfg: MedUnifierConfig, data: str | Path, run_dir: Path, steps: int,
                 resume: bool, notes: list[str]) -> dict[str, Any]:
    """Train (or, with `resume` and a saved model, reuse) one run; its timing, kept in the run folder."""
    timing_file = run_dir / TIMING_FILE
    if resume and (run_dir / "model" / "config.json").exists():
        notes.append(f"{run_dir}: model already trained, evaluated as is")
        return json.loads(timing_file.read_text()) if timing_file.exists() else {"s_per_step": None}
    start = time.perf_counter()
    result = train_fn(cfg, data, run_dir, max_steps=steps, resume=resume)
    timing = step_seconds(result, cfg, time.perf_counter() - start, steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    timing_file.write_text(json.dumps(timing, indent=2))
    return timing


def evaluate_generation(
    run_dir: str | Path,
    model: MedUnifier,
    data: str | Path,
    *,
    eval_data: str | Path | None = None,
    seed: int = 0,
    prior_steps: int = 500,
    n_generated: int = 100,
    samples_per_prompt: int = 2,
    fid: bool = True,
    classifier: str = "cnn",
    resume: bool = False,
    device: str | None = None,
) -> dict[str, float | None]:
    """Train the run's code prior for `prior_steps` steps, generate about `n_generated` images (balanced
    over the five competition findings) and score them; full results in `run_dir/eval/synthesis`.

    Returns `consistency` (macro), `fid` (Inception, or None without `fid`), `fid_domain`, their real-vs-real
    references, the classifier's validation accuracy and the generation time per image."""
    from medunifier.data.findings import COMPETITION_FINDINGS
    from medunifier.eval.synthesis import evaluate_synthesis
    from medunifier.generate.sampling import Synthesizer
    from medunifier.generate.train_prior import find_prior_dir, train_prior

    run_dir = Path(run_dir)
    finished = False
    if resume:
        try:
            meta = json.loads((find_prior_dir(run_dir) / "prior.json").read_text())
            finished = bool(meta.get("finished"))
        except (FileNotFoundError, ValueError):
            finished = False
    if not finished:
        train_prior(run_dir, data, max_steps=prior_steps, resume=resume, device=device, model=model,
                    log=lambda _: None)
    synth = Synthesizer.from_run(run_dir, device=device, model=model)
    per_finding = max(1, math.ceil(n_generated / (len(COMPETITION_FINDINGS) * samples_per_prompt)))
    results, _ = evaluate_synthesis(synth, data, eval_data, prompts_per_finding=per_finding,
                                    samples_per_prompt=samples_per_prompt, seed=seed, classifier=classifier,
                                    edits_per_finding=0, fid=fid, device=device, log=lambda _: None)
    write_results(results, run_dir / "eval" / "synthesis")
    inception, domain = results["fid"].get("inception"), results["fid"]["domain"]
    return {
        "consistency": results["consistency"]["macro"],
        "consistency_real": results["classifier"]["real_reference"]["macro"],
        "fid": inception["generated"] if inception else None,
        "fid_real_vs_real": inception["real_vs_real"] if inception else None,
        "fid_domain": domain["generated"],
        "fid_domain_real_vs_real": domain["real_vs_real"],
        "n_generated": float(results["fid"]["n"]["generated"]),
        "classifier_val_acc": results["classifier"].get("val_accuracy"),
        "gen_s_per_image": results["timings"]["generate_s_per_image"],
    }


def _vqa_scalars(results: dict[str, Any]) -> dict[str, float | None]:
    m = results["metrics"]
    return {"vqa_overall": m["accuracy"], "vqa_closed": m["closed_accuracy"], "vqa_open": m["open_accuracy"]}


def paired_differences(runs: dict[str, list[dict[str, Any]]], a: str = "task", b: str = "shared") -> dict[str, Any]:
    """mean ± std over the seeds both variants ran of (a - b), per metric."""
    by_seed = {v: {r["seed"]: r["metrics"] for r in runs.get(v, [])} for v in (a, b)}
    seeds = [s for s in by_seed[a] if s in by_seed[b]]
    keys = list(dict.fromkeys(k for s in seeds for k in by_seed[a][s]))
    out = {}
    for k in keys:
        pairs = [(by_seed[a][s].get(k), by_seed[b][s].get(k)) for s in seeds]
        out[k] = mean_std(x - y if x is not None and y is not None else None for x, y in pairs)
    return out


def run_experts_ablation(
    config: str | Path | MedUnifierConfig,
    data: str | Path,
    *,
    out: str | Path,
    variants: Sequence[str] = VARIANTS,
    vqa_data: str | Path | None = None,
    vqa_split: str = "val",
    vqa_objectives: Sequence[str] = DEFAULT_VQA_OBJECTIVES,
    synthesis: bool = True,
    prior_steps: int = 500,
    n_generated: int = 100,
    samples_per_prompt: int = 2,
    fid: bool = True,
    study: StudySettings = StudySettings(),
    generation_fn: Callable[..., dict[str, float | None]] | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train every expert variant with every seed, evaluate understanding / VQA / generation, write
    `out/results.json` and print one row per variant (mean ± std over seeds).

    Run folders: `out/<variant>/seed<k>` (pre-training; its prior and `eval/`) and `out/<variant>/seed<k>_vqa`
    (the VQA run). The default trainer is `train.loop.train`; `generation_fn` (signature of
    `evaluate_generation` minus the settings) replaces the generation metrics (tests).
    """
    train_fn = study.train_fn
    if train_fn is None:
        from medunifier.train.loop import train as train_fn
    load_fn = study.loader()
    if generation_fn is None:
        generation_fn = evaluate_generation
    if synthesis and (prior_steps < 1 or n_generated < 1):
        raise ValueError("prior_steps and n_generated must be >= 1")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or len(set(variants)) != len(variants):
        raise ValueError(f"variants must be distinct names from {VARIANTS}, got {list(variants)}")
    base = study.base_config(config)
    if not base.losses.enabled():
        raise ConfigError("the config switches every objective off")
    vqa_objs = parse_objectives("+".join(vqa_objectives)) if vqa_data is not None else None
    seeds_used, steps, resume = study.seed_list(), study.steps, study.resume
    prompt_sets = load_prompts(study.prompts)
    eval_data = study.eval_data
    eval_path, eval_split = resolve_eval_data(data, eval_data)
    out = Path(out)
    notes: list[str] = []
    runs: dict[str, list[dict[str, Any]]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for variant in variants:
        runs[variant] = []
        for seed in seeds_used:
            run_dir = out / variant / f"seed{seed}"
            cfg = experts_config(base, variant, seed, steps, prior_steps=prior_steps if synthesis else None)
            configs.setdefault(variant, cfg.to_dict())
            metrics: dict[str, float | None] = dict(_train_timed(train_fn, cfg, data, run_dir, steps, resume, notes))
            metrics.pop("s_per_step_source", None)
            model = load_fn(run_dir)
            metrics.update(parameter_counts(model))
            metrics.update(evaluate_understanding(model, run_dir / "eval", eval_path, eval_split, prompt_sets,
                                                  seed=seed, batch_size=study.batch_size))
            if synthesis:
                metrics.update(generation_fn(run_dir, model, data, eval_data=eval_data, seed=seed,
                                             prior_steps=prior_steps, n_generated=n_generated,
                                             samples_per_prompt=samples_per_prompt, fid=fid, resume=resume,
                                             device=study.device))
            del model
            if vqa_data is not None:
                metrics.update(_vqa_run(train_fn, load_fn, base, variant, seed, vqa_objs, vqa_data, vqa_split,
                                        out / variant / f"seed{seed}_vqa", study, notes))
            runs[variant].append({"seed": seed, "run_dir": str(run_dir), "metrics": metrics})

    results: dict[str, Any] = {
        "task": "experts",
        "config": str(config) if not isinstance(config, MedUnifierConfig) else base.name,
        "data": str(data),
        "eval_data": str(eval_path),
        "eval_split": eval_split,
        "prompts": str(study.prompts),
        "vqa_data": str(vqa_data) if vqa_data is not None else None,
        "vqa_split": vqa_split if vqa_data is not None else None,
        "vqa_objectives": vqa_objs,
        "synthesis": {"prior_steps": prior_steps, "n_generated": n_generated,
                      "samples_per_prompt": samples_per_prompt, "fid": fid} if synthesis else None,
        "steps": steps,
        "seeds": seeds_used,
        "variants": list(variants),
        "config_differences": _differences(configs),
        "summary": summarize_runs(runs),
        "paired_difference": paired_differences(runs) if {"shared", "task"} <= set(variants) else None,
        "runs": runs,
        "notes": notes,
    }
    write_results(results, out)
    print_experts_table(results, console)
    return results


def _vqa_run(train_fn: Callable[..., Any], load_fn: Callable[[Path], Any], base: MedUnifierConfig, variant: str,
             seed: int, objectives: list[str] | None, vqa_data: str | Path, split: str, run_dir: Path,
             study: StudySettings, notes: list[str]) -> dict[str, float | None]:
    """Train the variant on the VQA manifest with `objectives` and score its `split`."""
    from medunifier.eval.vqa import run_vqa

    cfg = experts_config(base, variant, seed, study.steps, objectives=objectives)
    timing = _train_timed(train_fn, cfg, vqa_data, run_dir, study.steps, study.resume, notes)
    model = load_fn(run_dir)
    results = run_vqa(model, vqa_data, run_dir / "eval" / "vqa", split=split, device=study.device,
                      batch_size=study.batch_size, progress=False, console=Console(quiet=True))
    return {**_vqa_scalars(results), "vqa_s_per_step": timing.get("s_per_step")}


def _differences(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Dotted config keys whose value differs between the variants' (first-seed) configs: {key: {variant: value}}."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                items.update(flat(v, f"{prefix}{k}."))
            else:
                items[f"{prefix}{k}"] = v
        return items

    flats = {v: flat(c) for v, c in configs.items()}
    keys = list(dict.fromkeys(k for f in flats.values() for k in f))
    return {k: {v: f.get(k) for v, f in flats.items()} for k in keys
            if len({json.dumps(f.get(k), sort_keys=True) for f in flats.values()}) > 1}


# ------------------------------------------------------------------------------------------------ table


def _pm(stat: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f}±{stat['std'] * scale:.{digits}f}"


def _params(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean'] / 1e6:.2f}M"


def _signed(text: str) -> str:
    return text if text == "-" or text.startswith("-") else "+" + text


def _signed_params(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean'] / 1e6:+.2f}M"


# two tables of (metric key, header, formatter), each narrow enough for an 80-column terminal; a column is
# shown when some variant has the metric
TABLES: dict[str, tuple[tuple[str, str, Callable[[dict[str, Any] | None], str]], ...]] = {
    "understanding, %": (
        ("i2t_p@1", "I2T P@1", _pm),
        ("zs_acc", "ZS acc", _pm),
        ("vqa_overall", "VQA all", _pm),
        ("vqa_closed", "VQA closed", _pm),
    ),
    "generation and cost": (
        ("consistency", "consist. %", _pm),
        ("fid", "FID", lambda s: _pm(s, 1.0, 1)),
        ("fid_domain", "FID dom.", lambda s: _pm(s, 1.0, 3)),
        ("params_total", "params", _params),
        ("s_per_step", "s/step", lambda s: _pm(s, 1.0, 3)),
    ),
}


def print_experts_table(results: dict[str, Any], console: Console | None = None) -> None:
    """One row per variant (mean±std over seeds) and a last row with the paired difference task - shared,
    as two tables: understanding (retrieval, zero-shot, VQA) and generation + cost."""
    summary = results["summary"]
    diff = results.get("paired_difference")
    for name, spec in TABLES.items():
        columns = [c for c in spec if any((row.get(c[0]) or {}).get("mean") is not None for row in summary.values())]
        if not columns:
            continue
        rows = [[variant, *[fmt(row.get(key)) for key, _, fmt in columns]] for variant, row in summary.items()]
        if diff:
            rows.append(["task - shared", *[_signed_params(diff.get(key)) if key.startswith("params") else
                                             _signed(fmt(diff.get(key))) for key, _, fmt in columns]])
        title = (f"shared vs task experts: {name} ({len(results['seeds'])} seeds x {results['steps']} steps, "
                 f"mean±std; eval {Path(results['eval_data']).name})")
        print_table(title, ["experts", *[header for _, header, _ in columns]], rows, console)
    for note in results.get("notes", []):
        (console or Console()).print(f"[yellow]note:[/yellow] {note}")
