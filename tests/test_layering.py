"""Imports flow one way through the package's layers, function-level imports included.

Layers, bottom to top (a module may import its own package and any layer below it, never one above, and
never a different package of the same rank):

    0  base      medunifier.config, medunifier.utils, medunifier.pretrained, medunifier.tokens (the special
                 tokens and tokenizer loading both layers above share), and `medunifier.__version__`
    1  data      medunifier.data       datasets, manifests, tokenizer, SynthCXR, converters
                         and `Processor` (tokenizer, prompt layout, image preprocessing -> tensors)
       model     medunifier.model      the networks, `MedUnifier`, `load_model`: takes tensors, so it does
                                       not import data/ (and data/ does not import it)
    2  train     medunifier.train      the training engine (loop, stage 0, checkpoints, optimiser, metrics)
    3  generate  medunifier.generate   code priors and sampling; prior training runs on the train engine, and
                                       `generate.prior_stage` runs it after `train` (the engine never calls it)
    4  eval      medunifier.eval       evaluators; some train models (ablations) or sample them (synthesis)
    5  apps      medunifier.serve, medunifier.demo_generation (the demo's generation part)
    6  demo      medunifier.demo
    7  cli       medunifier.cli
    8  api       medunifier (the package root, which re-exports the public API lazily)

`if TYPE_CHECKING:` imports count too: a type may only name what the module could import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import medunifier

PACKAGE = Path(medunifier.__file__).resolve().parent
RANKS = {
    "config": 0, "utils": 0, "pretrained": 0, "tokens": 0,
    "data": 1, "model": 1, "train": 2, "generate": 3, "eval": 4,
    "serve": 5, "demo_generation": 5, "demo": 6,
    "cli": 7,
}
API_RANK = 8

# The only imports allowed against the layering, each with its reason. Anything new here is a design
# decision: add it with its reason, or move the code.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _group(module: str) -> str:
    """'medunifier.eval.common' -> 'eval'; the package root -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(module: str) -> int:
    group = _group(module)
    if group == "":
        return API_RANK
    if group not in RANKS:
        raise AssertionError(f"{module}: no layer assigned; add its package to RANKS in {__file__}")
    return RANKS[group]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str | None = None) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) of every medunifier import in the file, at any depth.

    `module` names the file's module when it does not lie in the package (the checker's own test).
    """
    module = module or _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "medunifier"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] == "medunifier":
                found.append((node.lineno, target, [a.name for a in node.names]))
    return found


def _violations(extra: tuple[tuple[Path, str], ...] = ()) -> tuple[list[str], set[tuple[str, str]]]:
    """Imports against the layering (as messages) and the EXCEPTIONS that occurred; `extra` adds files
    outside the package as (path, module name)."""
    bad, used = [], set()
    files = [(path, _module_name(path)) for path in sorted(PACKAGE.rglob("*.py"))] + list(extra)
    for path, source in files:
        for line, target, names in _imports(path, source):
            if target == "medunifier" and set(names) <= {"__version__"}:
                continue  # the version string is base-layer data that the root happens to hold
            if _group(target) == _group(source):
                continue
            if _rank(target) < _rank(source) or (_rank(target) == 0 and _rank(source) == 0):
                continue
            if (source, target) in EXCEPTIONS:
                used.add((source, target))
                continue
            bad.append(f"{path}:{line}: {source} ({_group(source) or 'api'}) imports "
                       f"{target} ({_group(target) or 'api'}), which is not below it")
    return bad, used


def test_imports_follow_the_layers() -> None:
    bad, _ = _violations()
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_exception_is_still_needed() -> None:
    _, used = _violations()
    stale = sorted(set(EXCEPTIONS) - used)
    assert not stale, f"these exceptions no longer occur; remove them from EXCEPTIONS: {stale}"


def test_no_import_cycle_between_packages() -> None:
    """A stricter reading than the ranks alone: the package-level import graph has no cycle at all."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = _group(_module_name(path)) or "api"
        for _, target, names in _imports(path):
            group = _group(target) or "api"
            if group == "api" and set(names) <= {"__version__"}:
                continue
            if group != source:
                graph.setdefault(source, set()).add(group)
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError("package import cycle: " + " -> ".join([*trail[trail.index(node):], node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*trail, node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])


def test_the_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    code = ("from . import sibling\n"
            "def f():\n"
            "    from medunifier.eval.common import write_results\n"
            "    import medunifier.cli\n")
    path = tmp_path / "probe.py"
    path.write_text(code)
    module = "medunifier.train.probe"
    targets = [t for _, t, _ in _imports(path, module)]
    assert targets == ["medunifier.train", "medunifier.eval.common", "medunifier.cli"]
    bad, _ = _violations(((path, module),))
    assert [b.split(": ", 1)[1] for b in bad if "probe.py" in b] == [
        "medunifier.train.probe (train) imports medunifier.eval.common (eval), which is not below it",
        "medunifier.train.probe (train) imports medunifier.cli (cli), which is not below it"]
