"""Layers you can read from the imports: no import cycle among surgery's modules (imports made
inside functions counted, ``if TYPE_CHECKING:`` ones not), and no function-level import of a
``surgery`` module unless it is on the allow-list below with its reason. The graph is built from the
source (AST) the way ../shared/tools/import_layers.py builds it; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (importing module, imported module) -> why the import is made inside a function
ALLOWED_LAZY = {
    ("surgery.pruning.importance", "surgery.pruning.graph"): "torch-free --help: `surgery prune --help` lists the criteria",
    ("surgery.config.recipe", "surgery.data.sources"): "torch-free recipes: surgery.data's __init__ imports torch",
    # the pipeline (surgery.pruning.prune) imports neither the datasets nor ONNX: only what uses them loads them
    ("surgery.pruning.calibrate", "surgery.data"): "a lean pipeline: datasets load when a recipe's batches are iterated",
    ("surgery.pruning.latency", "surgery.deployment.export"): "a lean pipeline: ONNX export only for a latency budget",
    ("surgery.pruning.latency", "surgery.measure.split"): "a lean pipeline: ONNX Runtime profiling only for a latency budget",
    ("surgery.pruning.latency", "surgery.deployment.runtime"): "a lean pipeline: ONNX Runtime sessions only for a latency budget",
    ("surgery.pruning.latency", "surgery.pruning.latency_table"): "a lean pipeline: the latency table (ONNX Runtime) only for a latency budget",
}
# the command modules import the library inside their commands: `surgery --help` never loads torch
LAZY_PACKAGES = {"cli": "torch-free --help"}


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def _imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` for each import of a known module."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}  # fmt: skip
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")  # fmt: skip
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                found.append((t, id(node) in in_function, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    """Edges between surgery's modules; a package's own ``__init__`` (its face) is not a node to pass
    through."""
    mods = _modules("surgery")
    return {m: {t for t, _, _ in _imports(m, p, mods) if mods[t].name != "__init__.py"} for m, p in mods.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (function-level imports counted): " + "; ".join(" -> ".join(c) for c in cycles)


def test_function_level_imports_are_allowed_ones() -> None:
    lib = _modules("surgery")
    known = {**lib, **_modules("cli")}
    unexpected, used = [], set()
    for name, path in known.items():
        for target, lazy, line in _imports(name, path, known):
            if not lazy or target not in lib:
                continue
            if name.split(".")[0] in LAZY_PACKAGES:
                continue
            if (name, target) in ALLOWED_LAZY:
                used.add((name, target))
                continue
            unexpected.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not unexpected, "import at the top of the file (or add to ALLOWED_LAZY with a reason):\n" + "\n".join(unexpected)
    assert used == set(ALLOWED_LAZY), f"stale ALLOWED_LAZY entries: {sorted(set(ALLOWED_LAZY) - used)}"
