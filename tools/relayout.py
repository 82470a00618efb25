"""Group the flat modules of ``surgery/`` into subpackages by purpose (issue 25, item 6).

Run it from the repository root on a clean tree (it moves files with ``git mv``)::

    python tools/relayout.py --check    # validate the mapping, print the plan; changes nothing
    python tools/relayout.py            # move the files, rewrite every reference, fix import order

It fails (exit 2), listing them, when a module under ``surgery/`` is not in :data:`MAPPING`: add
each to the mapping (``old dotted name -> new dotted name``; identity for a module that stays) and
run it again. Running it twice is a no-op. What it rewrites:

- Python (``surgery/``, ``cli/``, ``tests/``, ``benchmarks/``, ``setup.py``): ``from .x import``,
  ``from ..x import``, ``from . import x``, ``from surgery import x`` through the AST (relative
  imports stay relative, absolute stay absolute; an import that now names two packages is split);
  then every dotted ``surgery.x[.y]`` in code, strings (monkeypatch targets, ``python -m``,
  ``import_module``), comments and docstrings; the public-API table ``_EXPORTS`` of
  ``surgery/__init__.py``; name strings of a ``*LAYER*`` table in ``tests/test_layers.py``.
- Text (``README.md``, ``docs/``, ``Makefile``, ``pyproject.toml``, recipes, ``.ci/``): dotted names and
  ``surgery/x.py`` paths; README's Layout block (the layer rows, names mapped, layer order kept)
  and one line per new subpackage in its folder block.
- Import order (``ruff check --select I --fix`` on the Python files it changed).

After it runs (by hand): read its ``look at:`` lines (bare ``prune.py`` in prose, a relative
``import_module`` string, code moved under a package whose ``__init__`` imports torch); reword prose
that the names alone do not fix (README Layout descriptions, ``surgery/measure/__init__.py``'s module
list); run ruff, ``tests/test_layers.py`` and the suite; commit (everything is staged); then delete this
script and ``tests/test_relayout.py``.

Checkpoints, recipes and ONNX files record no module path (a checkpoint's builder is a registered
name or the user's own ``module:function``; ONNX metadata keys are ``surgery.<key>`` with no module
among them, see :data:`NOT_MODULES`), so old names need no alias table and nothing is shimmed.

The subpackages (for the README):

| package | what it holds |
|---|---|
| `surgery/detectors/` | what can be pruned: the model registry and builders, `ModelSpec`, anchor surgery, scalable post-processing |
| `surgery/pruning/` | the pipeline rank -> allocate -> cut -> recover: dependency graph, importance criteria, allocators and budgets (MACs, latency, sensitivity), the cut, recovery, masked pruning, plans, sparse training |
| `surgery/training/` | the trainer and its hooks: EMA, distillation, DDP, QAT, run records, fine-tuning to new classes |
| `surgery/measure/` | the numbers: params/MACs, latency, mAP, `surgery bench`, file sizes |
| `surgery/deployment/` | ONNX export, ONNX Runtime sessions, INT8 quantization, runtimes, prediction, the deployment table |
| `surgery/storage/` | what is written and read safely: checkpoints, `surgery info`, atomic writes, overwrite guards and locks, the trust boundary |
| `surgery/config/` | recipes: the YAML schema, the shipped catalogue, settings hashes |
| `surgery/data/` | datasets: synthetic, COCO, VOC, YOLO txt |
| `surgery/yolo/` | the YOLO family: Ultralytics adapter (optional extra), hand-back, YOLOv2, YOLO distillation |
| top level | the public API (`__init__`), `python -m surgery`, the jobs (`workflows`, `sweep` with its state, table and plots in `report`), and the foundations every layer may import (`errors`, `registry`, `compat`) |
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------------------------
# The mapping: every module under surgery/ (old dotted name -> new dotted name). Identity entries
# say "stays". A key that is not in the tree is ignored (the names other branches were adding).

MAPPING: dict[str, str] = {
    # top level: the public API, the jobs and the foundations
    "surgery": "surgery",
    "surgery.__main__": "surgery.__main__",
    "surgery.errors": "surgery.errors",
    "surgery.registry": "surgery.registry",
    "surgery.compat": "surgery.compat",
    "surgery.workflows": "surgery.workflows",
    "surgery.sweep": "surgery.sweep",
    "surgery.sweep_state": "surgery.sweep_state",
    "surgery.sweep_table": "surgery.sweep_table",
    "surgery.compress": "surgery.compress",  # the goal-seeking job, beside the sweep
    # torch-free (the CLI's --help formats with it), so not under measure/, whose __init__ imports torch
    "surgery.report": "surgery.report",
    # detectors: what can be pruned
    "surgery.models": "surgery.detectors.builders",
    "surgery.specs": "surgery.detectors.specs",
    "surgery.anchors": "surgery.detectors.anchors",
    "surgery.postprocess": "surgery.detectors.postprocess",
    # pruning: rank -> allocate -> cut -> recover
    "surgery.graph": "surgery.pruning.graph",
    "surgery.index_maps": "surgery.pruning.index_maps",
    "surgery.importance": "surgery.pruning.importance",
    "surgery.calibrate": "surgery.pruning.calibrate",
    "surgery.allocate": "surgery.pruning.allocate",
    "surgery.target": "surgery.pruning.target",
    "surgery.latency": "surgery.pruning.latency",
    "surgery.latency_table": "surgery.pruning.latency_table",
    "surgery.sensitivity": "surgery.pruning.sensitivity",
    "surgery.cut": "surgery.pruning.cut",
    "surgery.recover": "surgery.pruning.recover",
    "surgery.masked": "surgery.pruning.masked",
    "surgery.plan": "surgery.pruning.plan",
    "surgery.sparsify": "surgery.pruning.sparsify",
    "surgery.prune": "surgery.pruning.prune",
    "surgery.budget": "surgery.pruning.budget",  # issue 25 items 1-3 (other branches)
    "surgery.candidate": "surgery.pruning.candidate",
    "surgery.reconstruct": "surgery.pruning.reconstruct",
    # training
    "surgery.train": "surgery.training.train",
    "surgery.hooks": "surgery.training.hooks",
    "surgery.callbacks": "surgery.training.callbacks",
    "surgery.ema": "surgery.training.ema",
    "surgery.distill": "surgery.training.distill",
    "surgery.distributed": "surgery.training.distributed",
    "surgery.qat": "surgery.training.qat",
    "surgery.records": "surgery.training.records",
    "surgery.transfer": "surgery.training.transfer",
    # measure (the package exists)
    "surgery.measure": "surgery.measure",
    "surgery.measure.count": "surgery.measure.count",
    "surgery.measure.size": "surgery.measure.size",
    "surgery.measure.split": "surgery.measure.split",
    "surgery.measure.timing": "surgery.measure.timing",
    "surgery.measure.workload": "surgery.measure.workload",
    "surgery.evaluate": "surgery.measure.evaluate",
    "surgery.bench": "surgery.measure.bench",
    # deployment
    "surgery.export": "surgery.deployment.export",
    "surgery.onnx_io": "surgery.deployment.onnx_io",
    "surgery.quantize": "surgery.deployment.quantize",
    "surgery.runtime": "surgery.deployment.runtime",
    "surgery.predict": "surgery.deployment.predict",
    "surgery.deploy": "surgery.deployment.table",
    # storage and trust
    "surgery.checkpoint": "surgery.storage.checkpoint",
    "surgery.info": "surgery.storage.info",
    "surgery.atomic": "surgery.storage.atomic",
    "surgery.safety": "surgery.storage.safety",
    "surgery.trust": "surgery.storage.trust",
    # config: recipes
    "surgery.recipe": "surgery.config.recipe",
    "surgery.catalog": "surgery.config.catalog",
    "surgery.settings": "surgery.config.settings",
    # data (the package exists)
    "surgery.data": "surgery.data",
    "surgery.data.coco": "surgery.data.coco",
    "surgery.data.datasets": "surgery.data.datasets",
    "surgery.data.draw": "surgery.data.draw",
    "surgery.data.images": "surgery.data.images",
    "surgery.data.loader": "surgery.data.loader",
    "surgery.data.sources": "surgery.data.sources",
    "surgery.data.synth": "surgery.data.synth",
    "surgery.data.voc": "surgery.data.voc",
    "surgery.data.yolo_txt": "surgery.data.yolo_txt",
    "surgery.data.yolo_format": "surgery.data.yolo_format",
    "surgery.data.image_folder": "surgery.data.image_folder",
    # yolo (the package exists)
    "surgery.yolo": "surgery.yolo",
    "surgery.yolo.config_check": "surgery.yolo.config_check",
    "surgery.yolo.distill": "surgery.yolo.distill",
    "surgery.yolo.interface": "surgery.yolo.interface",
    "surgery.yolo.ultralytics_adapter": "surgery.yolo.ultralytics_adapter",
    "surgery.yolo.ultralytics_handback": "surgery.yolo.ultralytics_handback",
    "surgery.yolo.yolov2": "surgery.yolo.yolov2",
    "surgery.yolo.pickle_probe": "surgery.yolo.pickle_probe",
    "surgery.yolo.ultralytics_trainer": "surgery.yolo.ultralytics_trainer",
}

# new package -> (one line for README's folder block, the package's __init__ docstring)
PACKAGES: dict[str, tuple[str, str]] = {
    "surgery.detectors": (
        "what can be pruned: model registry and builders, ModelSpec, anchors, post-processing",
        "What can be pruned: the model registry (every torchvision detection builder, the project's own\n"
        "compact builders, ``scheme:reference`` models such as ``ultralytics:yolov8n.yaml``), the\n"
        ":class:`ModelSpec` a checkpoint records to rebuild a model, anchor surgery (whole anchor shapes\n"
        "removed with their head channels) and the post-processing that keeps one-stage detectors fast.",
    ),
    "surgery.pruning": (
        "the pipeline rank -> allocate -> cut -> recover, its allocators, plans and sparse training",
        "The pruning pipeline, rank -> allocate -> cut -> recover (:mod:`.prune`): the channel-dependency\n"
        "graph with Torch-Pruning's fixes for detectors (:mod:`.graph`, :mod:`.index_maps`), importance\n"
        "criteria (:mod:`.importance`, :mod:`.calibrate`), allocators that turn a budget into per-group\n"
        "channel counts (:mod:`.allocate`, :mod:`.target`, :mod:`.latency`, :mod:`.sensitivity`), the cut\n"
        "(:mod:`.cut`), recovery without retraining (:mod:`.recover`), the typed plan a checkpoint records\n"
        "(:mod:`.plan`), the masked baseline (:mod:`.masked`) and prune-aware sparse training (:mod:`.sparsify`).",
    ),
    "surgery.training": (
        "the trainer and its hooks: EMA, distillation, DDP, QAT, run records, new classes",
        "Training: a small detection trainer (:mod:`.train`) whose every concern is a hook (:mod:`.hooks`):\n"
        "EMA, feature-imitation distillation, ``torchrun`` process groups, quantization-aware training,\n"
        "run folders and metrics, progress callbacks, and loading weights into a model with other classes\n"
        "(:mod:`.transfer`).",
    ),
    "surgery.deployment": (
        "ONNX export, ONNX Runtime sessions, INT8 quantization, runtimes, prediction",
        "Deployment: ONNX export (:mod:`.export`), every ONNX Runtime session and the file's metadata\n"
        "(:mod:`.onnx_io`), INT8 post-training quantization (:mod:`.quantize`), runtimes that call an\n"
        "exported detector like a torchvision one (:mod:`.runtime`), detections on image files\n"
        "(:mod:`.predict`) and the float-vs-INT8 deployment table (:mod:`.table`).",
    ),
    "surgery.storage": (
        "checkpoints, `surgery info`, atomic writes, overwrite guards, the trust boundary",
        "What is written and read, safely: checkpoints that rebuild without pickled code\n"
        "(:mod:`.checkpoint`), what a checkpoint is read without building it (:mod:`.info`), atomic writes\n"
        "(:mod:`.atomic`), outputs that never destroy data and their locks (:mod:`.safety`), and the trust\n"
        "boundary: what a checkpoint or a recipe may make this process run (:mod:`.trust`).",
    ),
    "surgery.config": (
        "recipes: the YAML schema, the shipped catalogue, settings hashes",
        "Recipes: versioned YAML validated into dataclasses (:mod:`.recipe`), the recipes shipped with\n"
        "surgery found by name (:mod:`.catalog`), and the hash of the recipe values behind each sweep step\n"
        "(:mod:`.settings`).",
    ),
}

# dotted strings that look like module names but are data: ONNX ``metadata_props`` keys
# (``surgery.<key>``, surgery/onnx_io.py METADATA_PREFIX); spared only as a subscript, ``meta["surgery.recipe"]``
NOT_MODULES = frozenset({"surgery.recipe"})

PY_ROOTS = ("surgery", "cli", "tests", "benchmarks", "tools", "setup.py")
TEXT_GLOBS = ("README.md", "*.md", "docs/**/*.md", "Makefile", "pyproject.toml", "recipes/*.yaml",
              "tests/data/*.yaml", ".ci/*", "benchmarks/*.md")
# this script and its test name old modules on purpose (the mapping): never rewritten
SELF = ("tools/relayout.py", "tests/test_relayout.py")
LAYERS_TEST = "tests/test_layers.py"


class RelayoutError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# the tree and the mapping


def module_name(rel: Path) -> str:
    name = ".".join(rel.with_suffix("").parts)
    return name.removesuffix(".__init__")


def module_path(name: str, package: bool) -> Path:
    parts = name.split(".")
    return Path(*parts, "__init__.py") if package else Path(*parts[:-1], parts[-1] + ".py")


def discover(root: Path) -> dict[str, Path]:
    """Every module under surgery/ (dotted name -> path relative to root)."""
    out = {}
    for path in sorted((root / "surgery").rglob("*.py")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts:
            continue
        out[module_name(rel)] = rel
    return out


@dataclass
class Plan:
    mapping: dict[str, str]  # every present module (old or already new) -> its final name
    moves: list[tuple[Path, Path]] = field(default_factory=list)
    new_packages: list[str] = field(default_factory=list)

    @property
    def moved(self) -> dict[str, str]:
        return {k: v for k, v in self.mapping.items() if k != v}


def make_plan(root: Path, mapping: dict[str, str] = MAPPING) -> Plan:
    present = discover(root)
    finals = set(mapping.values())
    finals |= {".".join(v.split(".")[:i]) for v in finals for i in range(2, len(v.split(".")))}  # new packages
    unknown = sorted(m for m in present if m not in mapping and m not in finals)
    if unknown:
        lines = "\n".join(f'    "{m}": "{m}",' for m in unknown)
        raise RelayoutError(f"{len(unknown)} module(s) under surgery/ are not in MAPPING; add each (old -> new):\n{lines}")
    _validate(mapping)
    full = {**{k: v for k, v in mapping.items() if k in present}, **{m: m for m in present if m in finals}}
    plan = Plan(mapping=dict(sorted(full.items())))
    for old, new in plan.moved.items():
        src = present[old]
        plan.moves.append((src, module_path(new, src.name == "__init__.py")))
    final_names = set(plan.mapping.values())
    for name in sorted(final_names):
        parts = name.split(".")
        for i in range(2, len(parts)):
            pkg = ".".join(parts[:i])
            if not (root / module_path(pkg, True)).exists() and pkg not in plan.new_packages:
                if pkg not in PACKAGES and mapping is MAPPING:
                    raise RelayoutError(f"new package {pkg} has no docstring in PACKAGES")
                plan.new_packages.append(pkg)
    return plan


def _validate(mapping: dict[str, str]) -> None:
    finals = list(mapping.values())
    dup = sorted({v for v in finals if finals.count(v) > 1})
    if dup:
        raise RelayoutError(f"two modules map to the same name: {dup}")
    packages = {".".join(v.split(".")[:i]) for v in finals for i in range(1, len(v.split(".")))}
    for old, new in mapping.items():
        if old == new:
            continue
        # an old name must not live on as another name's prefix, or a rerun could not tell old from new
        clash = [f for f in [*finals, *packages] if f == old or f.startswith(old + ".")]
        if clash:
            raise RelayoutError(f"moved module {old} is still a name in the new layout ({clash[0]}): pick another")


# --------------------------------------------------------------------------------------------
# rewriting names

DOTTED = re.compile(r"(?<![\w.])surgery((?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w.])surgery/((?:[A-Za-z_]\w*/)*[A-Za-z_]\w*)\.py\b")


def resolve(name: str, moved: dict[str, str]) -> str:
    """``name`` (a module or ``module.attribute``) with its longest moved module prefix renamed."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in moved:
            return ".".join([moved[head], *parts[i:]])
    return name


def rewrite_dotted(text: str, moved: dict[str, str], python: bool) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(0)
        if python and name in NOT_MODULES and text[m.start() - 2 : m.start()] in ('["', "['"):
            return name  # meta["surgery.recipe"]: an ONNX metadata key
        return resolve(name, moved)

    return DOTTED.sub(sub, text)


def rewrite_paths(text: str, moved: dict[str, str]) -> str:
    def sub(m: re.Match) -> str:
        name = "surgery." + m.group(1).replace("/", ".")
        new = resolve(name, moved)
        if new == name:
            return m.group(0)
        return module_path(new, False).as_posix()

    return PATH.sub(sub, text)


def short(name: str) -> str:
    return name.removeprefix("surgery.").replace(".", "/")


# --------------------------------------------------------------------------------------------
# Python imports (AST)


def _relative(target: str, importer_pkg: list[str]) -> str:
    t = target.split(".")
    common = 0
    while common < min(len(t), len(importer_pkg)) and t[common] == importer_pkg[common]:
        common += 1
    return "." * (len(importer_pkg) - common + 1) + ".".join(t[common:])


def _render(head: str, names: list[tuple[str, str | None]], indent: str) -> str:
    items = [n if a is None else f"{n} as {a}" for n, a in names]
    line = f"from {head} import {', '.join(items)}"
    if len(indent) + len(line) <= 110:
        return line
    body = "".join(f"{indent}    {i},\n" for i in items)
    return f"from {head} import (\n{body}{indent})"


def rewrite_imports(src: str, importer: str | None, final: str | None, is_init: bool, known: set[str],
                    moved: dict[str, str]) -> str:
    """``from ... import`` statements whose module moved. ``importer``: the file's current module
    name (``None`` outside surgery/, where relative imports are not surgery's)."""
    tree = ast.parse(src)
    lines = src.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            if importer is None:
                continue
            pkg = importer.split(".") if is_init else importer.split(".")[:-1]
            base_parts = pkg[: len(pkg) - node.level + 1]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base != "surgery" and not base.startswith("surgery."):
            continue
        groups: list[tuple[str, list[tuple[str, str | None]]]] = []
        for alias in node.names:
            full = f"{base}.{alias.name}"
            if alias.name != "*" and full in known:
                target = resolve(full, moved)
                head, _, name = target.rpartition(".")
                asname = alias.asname or (alias.name if name != alias.name else None)
            else:
                head, name, asname = resolve(base, moved), alias.name, alias.asname
            if groups and groups[-1][0] == head:
                groups[-1][1].append((name, asname))
            else:
                groups.append((head, [(name, asname)]))
        if node.level:
            new_pkg = final.split(".") if is_init else final.split(".")[:-1]
            groups = [(_relative(h, new_pkg), names) for h, names in groups]
        original_names = [(a.name, a.asname) for a in node.names]
        original_head = "." * node.level + (node.module or "")
        if len(groups) == 1 and groups[0][1] == original_names:
            if groups[0][0] == original_head:
                continue
            edits.append(("head", node, groups[0][0]))
        else:
            edits.append(("all", node, groups))
    for kind, node, what in sorted(edits, key=lambda e: (e[1].lineno, e[1].col_offset), reverse=True):
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        segment = src[start:end]
        if kind == "head":
            new = re.sub(r"^from\s+[.\w]+", f"from {what}", segment, count=1)
        else:
            indent = re.match(r"[ \t]*", lines[node.lineno - 1]).group(0)
            new = f"\n{indent}".join(_render(h, names, indent) for h, names in what)
            if "#" in segment:
                print(f"warning: comments inside a split import dropped: {segment!r}", file=sys.stderr)
        src = src[:start] + new + src[end:]
    return src


def rewrite_exports(src: str, moved: dict[str, str]) -> str:
    """The lazy public API of surgery/__init__.py: ``_EXPORTS = {"name": "module", ...}``."""
    tree = ast.parse(src)
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and "_EXPORTS" in ast.unparse(node).split("=")[0]:
            value = node.value
            if not isinstance(value, ast.Dict):
                continue
            for v in reversed(value.values):
                if isinstance(v, ast.Constant) and isinstance(v.value, str):
                    new = resolve("surgery." + v.value, moved).removeprefix("surgery.")
                    if new != v.value:
                        src = _replace_constant(src, v, repr(new).replace("'", '"'))
    return src


def _replace_constant(src: str, node: ast.AST, text: str) -> str:
    lines = src.splitlines(keepends=True)
    start = sum(len(line) for line in lines[: node.lineno - 1]) + node.col_offset
    end = sum(len(line) for line in lines[: node.end_lineno - 1]) + node.end_col_offset
    return src[:start] + text + src[end:]


SHORT_TOKEN = re.compile(r"[A-Za-z_]\w*(?:[./][A-Za-z_]\w*)*")


def rewrite_layer_table(src: str, moved: dict[str, str]) -> str:
    """String constants in a ``*LAYER*`` assignment of tests/test_layers.py that name modules the
    README way (``prune``, ``data/loader``, ``measure.count``)."""
    tree = ast.parse(src)
    consts = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and "LAYER" in t.id.upper() for t in targets) and node.value is not None:
            consts += [c for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    for c in sorted(consts, key=lambda c: (c.lineno, c.col_offset), reverse=True):
        new = SHORT_TOKEN.sub(lambda m: _map_short(m.group(0), moved), c.value)
        if new != c.value:
            src = _replace_constant(src, c, repr(new).replace("'", '"') if '"' not in new else repr(new))
    return src


def _map_short(token: str, moved: dict[str, str]) -> str:
    sep = "." if "." in token and "/" not in token else "/"
    name = "surgery." + token.replace("/", ".")
    if name.startswith("surgery.surgery."):
        return token
    new = moved.get(name)
    if new is None:
        return token
    return new.removeprefix("surgery.").replace(".", sep)


FILE_PARENTS = re.compile(r"(Path\(__file__\)\.resolve\(\))((?:\.parent)+)")
FILE_PARENTS_N = re.compile(r"(Path\(__file__\)(?:\.resolve\(\))?\.parents\[)(\d+)\]")


def rewrite_file_paths(src: str, depth: int) -> str:
    """``Path(__file__).resolve().parent.parent`` / ``.parents[N]`` in a module moved ``depth``
    folders deeper (the shipped recipes are found beside the package that way)."""
    if depth == 0:
        return src
    src = FILE_PARENTS.sub(lambda m: m.group(1) + ".parent" * max(m.group(2).count(".parent") + depth, 0), src)
    return FILE_PARENTS_N.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + depth}]", src)


def rewrite_python(rel: Path, src: str, plan: Plan, known: set[str]) -> str:
    moved = plan.moved
    importer = module_name(rel) if rel.parts[0] == "surgery" else None
    final = plan.mapping.get(importer, importer) if importer else None
    out = rewrite_imports(src, importer, final, rel.name == "__init__.py", known, moved)
    if importer and final != importer:
        out = rewrite_file_paths(out, final.count(".") - importer.count("."))
    out = rewrite_dotted(out, moved, python=True)
    out = rewrite_paths(out, moved)
    if rel.as_posix() == "surgery/__init__.py":
        out = rewrite_exports(out, moved)
    if rel.as_posix() == LAYERS_TEST:
        out = rewrite_layer_table(out, moved)
    return out


# --------------------------------------------------------------------------------------------
# README's Layout block


def _split_row_line(line: str, col: int) -> tuple[str, str, int]:
    """(names, description, column of the description): at the first gap of two spaces, or at the
    block's description column where the names run up to it with one space."""
    m = re.match(r"^(\s*\S.*?)(\s{2,})(\S.*)?$", line)
    if m and m.group(3) is not None:
        return m.group(1), m.group(3), m.end(2)
    if col > 0 and len(line) > col and line[col - 1] == " ":
        return line[:col], line[col:], col
    return line.rstrip(), "", -1


def _expand(token: str) -> list[str]:
    m = re.fullmatch(r"(.*/)\{([^}]*)\}", token)
    return [m.group(1) + t.strip() for t in m.group(2).split(",")] if m else [token]


def _group(tokens: list[str]) -> list[str]:
    out: list[list[str]] = []
    for t in tokens:
        head = t.rpartition("/")[0]
        if out and head and out[-1][0].rpartition("/")[0] == head:
            out[-1].append(t)
        else:
            out.append([t])
    return [g[0] if len(g) == 1 else f"{g[0].rpartition('/')[0]}/{{{','.join(x.rpartition('/')[2] for x in g)}}}"
            for g in out]


def rewrite_layout_rows(block: list[str], moved: dict[str, str]) -> list[str]:
    """The layer rows (``name · name    description``; continuation lines indented): names mapped,
    rows kept in order; verbatim when no name moved."""
    rows: list[list[str]] = []
    for line in block:
        if rows and line.startswith("  "):
            rows[-1].append(line)
        else:
            rows.append([line])
    cols = [_split_row_line(row[0], 0)[2] for row in rows]
    block_col = max(set(cols), key=cols.count) if cols else 0
    parsed, changed = [], False
    for row in rows:
        lefts, descs = [], []
        for i, line in enumerate(row):
            left, desc, col = _split_row_line(line, block_col + (2 if i else 0))
            lefts.append(left.strip())
            descs.append((desc, col, i))
        tokens = [t for part in " ".join(lefts).split("·") for t in _expand(part.strip()) if t]
        mapped = [_map_short(t, moved) for t in tokens]
        changed |= mapped != tokens
        base = next((c for _, c, _ in descs if c >= 0), 0)
        parsed.append((_group(mapped), [(d, max(c - base, 0)) for d, c, _ in descs if d]))
    if not changed:
        return block
    width = 44
    out = []
    for tokens, descs in parsed:
        left_lines, cur = [], ""
        for i, t in enumerate(tokens):
            piece = t + (" ·" if i < len(tokens) - 1 else "")
            if cur and len(cur) + 1 + len(piece) > width - 2:
                left_lines.append(cur)
                cur = "  " + piece
            else:
                cur = f"{cur} {piece}" if cur else piece
        left_lines.append(cur)
        for i in range(max(len(left_lines), len(descs))):
            left = left_lines[i] if i < len(left_lines) else ""
            desc, offset = descs[i] if i < len(descs) else ("", 0)
            out.append((left.ljust(width + offset) + desc).rstrip() if desc else left)
    return out


def rewrite_readme(text: str, plan: Plan) -> str:
    lines = text.split("\n")
    try:
        at = next(i for i, line in enumerate(lines) if line.strip() == "## Layout")
    except StopIteration:
        return text
    fences = [i for i in range(at, len(lines)) if lines[i].startswith("```")]
    if len(fences) < 2:
        return text
    start, end = fences[0] + 1, fences[1]
    lines[start:end] = rewrite_layout_rows(lines[start:end], plan.moved)
    fences = [i for i in range(at, len(lines)) if lines[i].startswith("```")]
    if len(fences) >= 4:  # the folder block (cli/, recipes/, ...): one line per new subpackage
        s, e = fences[2] + 1, fences[3]
        have = {line.split()[0] for line in lines[s:e] if line.strip()}
        new = [f"{p.replace('.', '/')}/".ljust(21) + PACKAGES[p][0] for p in sorted(PACKAGES) if p in _packages(plan)]
        new = [n for n in new if n.split()[0] not in have]
        lines[s:s] = new
    return "\n".join(lines)


def _packages(plan: Plan) -> list[str]:
    return sorted({".".join(v.split(".")[:i]) for v in plan.mapping.values() for i in range(2, len(v.split(".")))})


# --------------------------------------------------------------------------------------------
# the run


def _files(root: Path) -> tuple[list[Path], list[Path]]:
    py, text = set(), set()
    for r in PY_ROOTS:
        p = root / r
        if p.is_file():
            py.add(p.relative_to(root))
        elif p.is_dir():
            py |= {f.relative_to(root) for f in p.rglob("*.py") if "__pycache__" not in f.parts and ".venv" not in f.parts}
    for pattern in TEXT_GLOBS:
        text |= {f.relative_to(root) for f in root.glob(pattern) if f.is_file()}
    py -= {Path(p) for p in SELF}
    py = {p for p in py if not any(part.startswith(".") for part in p.parts)}
    return sorted(py), sorted(text - py)


def compute_edits(root: Path, plan: Plan) -> dict[Path, str]:
    """New contents per file (keyed by the file's current path); only files that change."""
    known = set(plan.mapping) | set(plan.mapping.values()) | set(_packages(plan))
    py, text = _files(root)
    edits = {}
    for rel in py:
        src = (root / rel).read_text()
        new = rewrite_python(rel, src, plan, known)
        if new != src:
            edits[rel] = new
    for rel in text:
        src = (root / rel).read_text()
        new = rewrite_paths(rewrite_dotted(src, plan.moved, python=False), plan.moved)
        if rel.as_posix() == "README.md":
            new = rewrite_readme(new, plan)
        if new != src:
            edits[rel] = new
    return edits


def leftovers(root: Path, plan: Plan) -> list[str]:
    """Mentions a human should look at: bare ``name.py`` of a moved module in docs, relative module
    strings handed to ``import_module``."""
    names = {old.rpartition(".")[2] for old in plan.moved}
    bare = re.compile(r"(?<![\w/.])(" + "|".join(sorted(names)) + r")\.py\b") if names else None
    out = []
    py, text = _files(root)
    for rel in [*text, *py]:
        for i, line in enumerate((root / rel).read_text().splitlines(), 1):
            if bare and bare.search(line):
                out.append(f"{rel}:{i}: bare file name: {line.strip()[:100]}")
            if "__file__" in line and not FILE_PARENTS.search(line) and not FILE_PARENTS_N.search(line) \
                    and rel.parts[0] == "surgery" and module_name(rel) in {*plan.moved, *plan.moved.values()}:
                out.append(f"{rel}:{i}: a path from __file__ in a moved module: {line.strip()[:100]}")
            handled = rel.parts[0] == "cli" or rel.as_posix() == "surgery/__init__.py"  # cli/ stays; _EXPORTS
            if not handled and re.search(r"import_module\(\s*f?[\"']\.", line):
                out.append(f"{rel}:{i}: relative import_module string: {line.strip()[:100]}")
    for old, new in sorted(plan.moved.items()):
        init = root / module_path(new.rpartition(".")[0], True)
        if new.rpartition(".")[0] not in plan.new_packages and init.is_file() and _imports_something(init):
            out.append(f"{old} -> {new}: importing it now runs {init.relative_to(root)}, which imports modules"
                       " (torch-free code must not move there)")
    return out


def _imports_something(path: Path) -> bool:
    return any(isinstance(n, (ast.Import, ast.ImportFrom)) and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")
               for n in ast.parse(path.read_text()).body)


def _git(root: Path, *args: str) -> bool:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).returncode == 0


def apply(root: Path, plan: Plan, edits: dict[Path, str], fix_order: bool = True) -> list[Path]:
    for rel, new in edits.items():
        (root / rel).write_text(new)
    for pkg in plan.new_packages:
        init = root / module_path(pkg, True)
        init.parent.mkdir(parents=True, exist_ok=True)
        doc = PACKAGES.get(pkg, ("", f"The {pkg} package."))[1]
        init.write_text(f'"""{doc}"""\n')
        _git(root, "add", str(init.relative_to(root)))
    moved_to = {}
    for src, dst in plan.moves:
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        if not _git(root, "mv", str(src), str(dst)):
            os.replace(root / src, root / dst)  # untracked (or not a git tree)
        moved_to[src] = dst
    changed = [moved_to.get(rel, rel) for rel in edits]
    py = [str(p) for p in changed if p.suffix == ".py"]
    if fix_order and py:
        ruff = Path(sys.executable).parent / "ruff"
        cmd = [str(ruff) if ruff.exists() else "ruff", "check", "-q", "--select", "I", "--fix", *py]
        subprocess.run(cmd, cwd=root, capture_output=True)
    if changed:  # the whole relayout staged: `git status` shows renames, `git commit` takes it all
        _git(root, "add", "--", *[str(p) for p in changed])
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="validate the mapping and print the plan; change nothing")
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        plan = make_plan(args.root)
    except RelayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    edits = compute_edits(args.root, plan)
    for src, dst in plan.moves:
        print(f"move {src} -> {dst}")
    for pkg in plan.new_packages:
        print(f"package {pkg}")
    print(f"{len(plan.moves)} moves, {len(plan.new_packages)} new packages, {len(edits)} files rewritten")
    if args.check:
        readme = edits.get(Path("README.md"))
        if readme is not None:  # the proposed Layout section
            section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
            print("README.md ## Layout, as it would be:\n## Layout" + section)
    else:
        apply(args.root, plan, edits)
    for line in leftovers(args.root, plan):
        print(f"look at: {line}")
    print(f"{'checked' if args.check else 'done'} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
