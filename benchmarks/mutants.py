"""A mutation pass over the pruning pipeline: ``make mutants``.

Each mutant is one plausible bug, written as an exact source edit (``old`` -> ``new``) in one
module, with the tests that should catch it (the module's own tests, narrowed with ``-k`` so the
pass stays bounded on 2 cores). For each mutant the tree is copied to a temporary folder, the edit
applied there (the checkout is never touched), and the tests run against the copy. A mutant whose
tests still pass *survived*: a behaviour no test pins down.

A mutant whose ``old`` text is no longer in the module is reported as ``stale`` (the code moved or
changed): update its edit, don't drop it. The list is the first seven bugs the suite missed in a
review (issue "a suite that proves each feature") plus a few more in the allocation and rounding
code.

    python benchmarks/mutants.py                  # all mutants, one line each, survivors at the end
    python benchmarks/mutants.py --only ridge     # mutants whose name contains "ridge"
    python benchmarks/mutants.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("surgery", "cli", "tests", "recipes", "pyproject.toml", "setup.py", "README.md", "docs")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # the module, relative to the repository root
    old: str  # exact text, present once
    new: str
    tests: tuple[str, ...]  # pytest arguments


MUTANTS: tuple[Mutant, ...] = (
    Mutant("latency allocator plans without its latency table", "surgery/pruning/latency.py",
           "    return Allocation(plan=plan(target.ratios), group_ratios=dict(target.ratios), target=target)",
           "    return Allocation(plan=plan({}), group_ratios=dict(target.ratios), target=target)",
           ("tests/test_latency.py",)),
    Mutant("quantize --form auto always writes one form", "surgery/deployment/quantize.py",
           "ranges=ranges, reduce_range=reduce_range,\n                               form=form)",
           "ranges=ranges, reduce_range=reduce_range,\n                               form=\"qdq-per-channel\")",
           ("tests/test_int8_forms.py", "-k", "auto")),
    Mutant("config allow-list skipped for head rows", "surgery/yolo/config_check.py",
           "        if not isinstance(m, str) or m not in MODULES:",
           "        if part != \"head\" and (not isinstance(m, str) or m not in MODULES):",
           ("tests/test_yolo_config_check.py", "-k", "bad_configs")),
    Mutant("class names shifted by one in the hand-back", "surgery/yolo/ultralytics_handback.py",
           "enumerate(class_names[1:])", "enumerate(class_names[:-1])",
           ("tests/test_yolo_handback.py",)),
    Mutant("recovery ridge x 10^4", "surgery/pruning/recover.py",
           "DEFAULT_RIDGE = 1e-2", "DEFAULT_RIDGE = 1e2",
           ("tests/test_recover.py", "-k", "refit_lowers")),
    Mutant("sensitivity allocator ignores the MACs saved", "surgery/pruning/sensitivity.py",
           "            k = (dl / ds, -ds)", "            k = (dl, -ds)",
           ("tests/test_recover.py", "-k", "allocation")),
    Mutant("resume does not restore the RNG", "surgery/training/train.py",
           "        if ts.get(\"rng\") and self.dist.is_main:", "        if False and ts.get(\"rng\") and self.dist.is_main:",
           ("tests/test_train.py", "-k", "resume")),
    Mutant("keep_count rounds the kept channels down", "surgery/pruning/allocate.py",
           "    keep = math.ceil(channels * (1.0 - ratio) - 1e-9)", "    keep = math.floor(channels * (1.0 - ratio) - 1e-9)",
           ("tests/test_allocate_rounding.py", "tests/test_prune_options.py", "-k", "keep_count or round")),
    Mutant("thin groups keep the full round_to one width too long", "surgery/pruning/allocate.py",
           "    while step > 1 and channels < THIN_GROUP_FACTOR * step:",
           "    while step > 1 and channels < (THIN_GROUP_FACTOR - 1) * step:",
           ("tests/test_allocate_rounding.py", "-k", "thin or keep_count")),
    Mutant("allocation: global ranks per group", "surgery/pruning/budget.py",
           '    global_ranking = cfg.global_ranking or cfg.allocation == "global"', "    global_ranking = cfg.global_ranking",
           ("tests/test_prune_options.py", "-k", "global")),
    Mutant("l1 ranks by the L2 norm", "surgery/pruning/importance.py",
           'IMPORTANCES.add("l1", Criterion("l1", _magnitude(1),', 'IMPORTANCES.add("l1", Criterion("l1", _magnitude(2),',
           ("tests/test_prune_options.py", "tests/test_equivalence.py", "-k", "ranking or l1")),
    Mutant("MACs target accepts a 10x looser tolerance", "surgery/pruning/target.py",
           "        within_tolerance=abs(achieved / target - 1.0) <= tol,",
           "        within_tolerance=abs(achieved / target - 1.0) <= 10 * tol,",
           ("tests/test_target.py", "-k", "unreachable")),
)


def _copy_tree(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.onnx"))
        elif src.is_file():
            shutil.copy2(src, dest / name)


def run_mutant(m: Mutant, timeout: float) -> tuple[str, float]:
    """``killed`` | ``survived`` | ``stale`` | ``timeout``, and the seconds the tests took."""
    source = (ROOT / m.path).read_text()
    if source.count(m.old) != 1:
        return "stale", 0.0
    with tempfile.TemporaryDirectory(prefix="surgery-mutant-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        (tree / m.path).write_text(source.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONDONTWRITEBYTECODE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        if proc.returncode == 5:  # no test collected: the selection is stale
            return "stale", seconds
        return ("survived" if proc.returncode == 0 else "killed"), seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the mutants whose name contains this text")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant's tests")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.path:40s} {m.name}")
        return 0
    results = []
    for m in chosen:
        verdict, seconds = run_mutant(m, args.timeout)
        results.append((m, verdict))
        print(f"{verdict:9s} {seconds:6.1f} s  {m.path}: {m.name}", flush=True)
    bad = [(m, v) for m, v in results if v != "killed"]
    print(f"\n{len(results) - len(bad)} of {len(results)} mutants killed")
    for m, v in bad:
        print(f"  {v}: {m.name} ({m.path}; tests: {' '.join(m.tests)})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
