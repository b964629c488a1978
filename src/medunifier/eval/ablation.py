"""Objective ablation (paper Table 6): the same run with a subset of ITC / ITM / ITG / TIG.

For every objective set and seed the config is trained for the same number of steps with the other
loss weights set to zero, then evaluated with retrieval (precision@K), zero-shot classification and a
linear probe at several label fractions. The table shows mean ± std over seeds, one row per set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from medunifier.config import OBJECTIVES, MedUnifierConfig, load_config
from medunifier.eval.common import load_split, print_table, write_results
from medunifier.eval.finetune import run_finetune
from medunifier.eval.metrics import mean_std
from medunifier.eval.retrieval import run_retrieval
from medunifier.eval.zeroshot import load_prompts, run_zeroshot
from medunifier.model import load_model
from medunifier.model.protocols import ImageTextModel
from medunifier.utils import check_fields

DEFAULT_OBJECTIVE_SETS = ("itc", "itc+itm", "itc+itm+itg", "itc+itm+tig", "all")


def parse_objectives(name: str) -> list[str]:
    """'itc+itm' -> ['itc', 'itm']; 'all' -> every objective."""
    if name.strip() == "all":
        return list(OBJECTIVES)
    parts = [p.strip() for p in name.split("+") if p.strip()]
    unknown = [p for p in parts if p not in OBJECTIVES]
    if unknown or not parts:
        raise ValueError(f"objective set '{name}': use '+'-joined names from {OBJECTIVES} or 'all'")
    return parts


def ablation_config(base: MedUnifierConfig, objectives: Sequence[str], seed: int, steps: int) -> MedUnifierConfig:
    """`base` with only `objectives` switched on (their weight kept, or 1 when the base had 0), the seed and
    a schedule of `steps` steps. Curriculum stages with their own loss weights get the same mask."""
    config = base.model_copy(deep=True)
    for name in OBJECTIVES:
        weight = getattr(base.losses, name)
        setattr(config.losses, name, (weight if weight > 0 else 1.0) if name in objectives else 0.0)
    for stage in config.train.stages:
        if stage.losses is not None:
            for name in OBJECTIVES:
                if name not in objectives:
                    setattr(stage.losses, name, 0.0)
    config.train.seed = seed
    config.train.max_steps = steps
    return config


def _scalars(retrieval: dict | None, zeroshot: dict | None, probe: dict | None) -> dict[str, float | None]:
    """The Table 6 numbers of one trained run."""
    row: dict[str, float | None] = {}
    if retrieval is not None:
        for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
            for k, v in retrieval[direction]["precision_at_k"].items():
                row[f"{short}_p@{k}"] = v
    if zeroshot is not None:
        row["zs_acc"] = zeroshot["accuracy"]
        row["zs_f1"] = zeroshot["macro_f1"]
        row["zs_auroc"] = zeroshot["auroc"]
    if probe is not None:
        metric = probe["primary_metric"]
        for fraction, stats in probe["per_fraction"].items():
            row[f"lp_{float(fraction) * 100:g}%_{metric}"] = stats[metric]["mean"]
    return row


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """3 -> [0, 1, 2]; an explicit list is kept."""
    return list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]


def evaluate_understanding(
    model: ImageTextModel,
    out: str | Path,
    eval_path: str | Path,
    eval_split: str | None,
    prompt_sets: dict[str, list[str]],
    *,
    probe_data: str | Path | None = None,
    fractions: Sequence[float] = (),
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float | None]:
    """Retrieval and zero-shot on `eval_path` (classes = the prompt file's), plus a linear probe on the
    train / val / test splits of `probe_data` when given; results under `out/{retrieval,zeroshot,linear}`.
    Returns the flat scalars of one trained run (`i2t_p@K`, `t2i_p@K`, `zs_acc`, `zs_f1`, `zs_auroc`, `lp_*`)."""
    out = Path(out)
    classes = list(prompt_sets)
    quiet = Console(quiet=True)
    retrieval = run_retrieval(model, eval_path, out / "retrieval", classes=classes, split=eval_split,
                              batch_size=batch_size, console=quiet)
    zeroshot = run_zeroshot(model, eval_path, prompt_sets, out / "zeroshot", split=eval_split,
                            batch_size=batch_size, console=quiet)
    probe = None
    if probe_data is not None:
        probe = run_finetune(model, probe_data, probe_data, probe_data, out / "linear", fractions=fractions,
                             seeds=[seed], mode="linear", classes=classes, batch_size=batch_size, console=quiet)
    return _scalars(retrieval, zeroshot, probe)


def run_model_loader(device: str | None) -> Callable[[Path], Any]:
    """A loader of the model a run folder saved, onto `device`.

    Args:
        device: cuda or cpu (None: cuda when available).
    """
    def load(run_dir: Path) -> Any:
        return load_model(run_dir, device)

    return load


@dataclass(frozen=True)
class StudySettings:
    """What the training studies (the objective ablation, shared vs task experts) share: every run's seeds
    and budget, the understanding evaluation, and how runs are trained, resumed and loaded.

    Args:
        seeds: the number of seeds (0..n-1), or the seeds themselves.
        steps: training steps of every run, >= 1.
        eval_data: the retrieval / zero-shot manifest (None: each study's default, from `data`).
        prompts: the zero-shot prompt set: a shipped name or a YAML file.
        overrides: config overrides, applied when the config is a preset name or a YAML file.
        resume: reuse finished runs and resume interrupted ones.
        batch_size: evaluation batch size, >= 1.
        device: evaluation device (None: cuda when available).
        train_fn: replaces the study's trainer (tests).
        load_fn: replaces the loader of a run folder's model (tests).
    """

    seeds: int | Sequence[int] = 3
    steps: int = 1000
    eval_data: str | Path | None = None
    prompts: str | Path = "chexpert5"
    overrides: list[str] | None = None
    resume: bool = False
    batch_size: int = 64
    device: str | None = None
    train_fn: Callable[..., Any] | None = None
    load_fn: Callable[[Path], Any] | None = None

    def __post_init__(self) -> None:
        check_fields(self, (("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1")))

    def seed_list(self) -> list[int]:
        """3 -> [0, 1, 2]; explicit seeds are kept."""
        return seed_list(self.seeds)

    def loader(self) -> Callable[[Path], Any]:
        """load_fn, or the loader of a run folder's model onto the device."""
        return self.load_fn or run_model_loader(self.device)

    def base_config(self, config: str | Path | MedUnifierConfig) -> MedUnifierConfig:
        """The study's base config: a config object as it is, else the preset or file with the overrides."""
        return config if isinstance(config, MedUnifierConfig) else load_config(config, self.overrides)


def summarize_runs(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """{row: [{"metrics": {...}}, ...]} -> {row: {metric: mean_std over the runs}} (keys in first-seen order)."""
    summary: dict[str, dict[str, Any]] = {}
    for name, seed_runs in runs.items():
        keys = list(dict.fromkeys(k for r in seed_runs for k in r["metrics"]))
        summary[name] = {k: mean_std(r["metrics"].get(k) for r in seed_runs) for k in keys}
    return summary


def run_ablation(
    config: str | Path | MedUnifierConfig,
    data: str | Path,
    out: str | Path,
    objectives: Sequence[str] = DEFAULT_OBJECTIVE_SETS,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    study: StudySettings = StudySettings(),
    console: Console | None = None,
) -> dict[str, Any]:
    """Train every objective set with every seed for `study.steps` steps, evaluate, print Table 6's layout.

    Training reads the train (and val) split of `data`. Retrieval and zero-shot use `study.eval_data`
    (default: the test split of `data`), with the classes of the prompt file; the linear probe uses the
    train / val / test splits of `data` (at the label `fractions`) and is left out (with a note) when `data`
    lacks one. Run folders are `out/<set>/seed<k>`; with `study.resume`, a run whose model is already saved
    is evaluated without training. The default trainer is `generate.prior_stage.pretrain`.
    """
    train_fn = study.train_fn
    if train_fn is None:
        from medunifier.generate.prior_stage import pretrain as train_fn
    load_fn = study.loader()
    base = study.base_config(config)
    seeds_used, steps, eval_data = study.seed_list(), study.steps, study.eval_data
    sets = {name: parse_objectives(name) for name in objectives}
    prompt_sets = load_prompts(study.prompts)
    out = Path(out)
    eval_path, eval_split = (Path(eval_data), None) if eval_data is not None else (Path(data), "test")
    notes: list[str] = []
    splits = {r.split for r in load_split(data)[0]}
    if eval_data is None and "test" not in splits:
        raise ValueError(f"{data} has no test split: pass eval_data (a held-out manifest for retrieval and zero-shot)")
    probe_ok = {"train", "val", "test"} <= splits
    if not probe_ok:
        notes.append(f"linear probe left out: {data} holds splits {sorted(splits)}, not train, val and test")

    runs: dict[str, list[dict[str, Any]]] = {}
    for name, objs in sets.items():
        runs[name] = []
        for seed in seeds_used:
            run_dir = out / name.replace("+", "_") / f"seed{seed}"
            cfg = ablation_config(base, objs, seed, steps)
            if study.resume and (run_dir / "model" / "config.json").exists():
                notes.append(f"{run_dir}: model already trained, evaluated as is")
            else:
                train_fn(cfg, data, run_dir, max_steps=steps, resume=study.resume)
            model = load_fn(run_dir)
            metrics = evaluate_understanding(model, run_dir / "eval", eval_path, eval_split, prompt_sets,
                                             probe_data=data if probe_ok else None, fractions=fractions,
                                             seed=seed, batch_size=study.batch_size)
            runs[name].append({"seed": seed, "objectives": objs, "run_dir": str(run_dir), "metrics": metrics})
            del model

    summary = summarize_runs(runs)
    results = {
        "task": "ablation",
        "config": str(config) if not isinstance(config, MedUnifierConfig) else base.name,
        "data": str(data),
        "eval_data": str(eval_path),
        "prompts": str(study.prompts),
        "steps": steps,
        "seeds": seeds_used,
        "objective_sets": {n: objs for n, objs in sets.items()},
        "summary": summary,
        "runs": runs,
        "notes": notes,
    }
    write_results(results, out)
    print_ablation_table(results, console)
    return results


def _short(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean'] * 100:.1f}±{stat['std'] * 100:.1f}"


ABLATION_HEADERS = {"i2t_p@": "I2T P@", "t2i_p@": "T2I P@", "zs_acc": "ZS acc", "zs_f1": "ZS F1",
                    "zs_auroc": "ZS AUROC", "lp_": "LP "}


def _header(key: str) -> str:
    for prefix, label in ABLATION_HEADERS.items():
        if key.startswith(prefix):
            return label + key[len(prefix):].replace("_", " ")
    return key


def print_ablation_table(results: dict[str, Any], console: Console | None = None) -> None:
    """Paper Table 6's layout (rows: objective sets; columns: metrics; mean±std over seeds, in %), printed as
    two tables, retrieval and classification, so that each fits a terminal."""
    summary = results["summary"]
    keys = list(dict.fromkeys(k for row in summary.values() for k in row))
    groups = {
        "retrieval, precision@K": [k for k in keys if k.startswith(("i2t_", "t2i_"))],
        "zero-shot and linear probe": [k for k in keys if k.startswith(("zs_", "lp_")) and k != "zs_auroc"],
    }
    for name, columns in groups.items():
        if not columns:
            continue
        rows = [[objs, *[_short(row.get(c)) for c in columns]] for objs, row in summary.items()]
        title = (f"objective ablation: {name} ({len(results['seeds'])} seeds x {results['steps']} steps, "
                 "mean±std, %)")
        print_table(title, ["objectives", *[_header(c) for c in columns]], rows, console)
    for note in results.get("notes", []):
        (console or Console()).print(f"[yellow]note:[/yellow] {note}")
