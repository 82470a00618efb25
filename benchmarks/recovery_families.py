"""Cross-family accuracy-recovery benchmark (`make recovery`): one sweep per family, one table.

For each family recipe (``recipes/recovery_<family>.yaml``: the quickstart FCOS, YOLOv8n, a slim
anchor-based RetinaNet, YOLO11n, YOLO26n) and each data seed run ``surgery sweep`` (resumable: a
rerun reuses finished steps) into ``OUT/<family>`` (the recipe's own seed alone, the default) or
``OUT/<family>/seed<N>`` (``--seeds``: one sweep per seed, on a recipe copy whose ``data.seed`` is N),
then merge every structured variant's row into one CSV with a fixed schema (one row per family,
technique, MACs target and data seed) and a README-ready markdown table: mAP right after the cut,
after recovery without retraining (``map_recovered``, when the sweep wrote that column), after the
equal retraining budget, and the fraction of the dense control's mAP retained, at 50% and 75% MACs
cuts, per technique; over several seeds the mean, and for recovery and retained the min-max range.

    python benchmarks/recovery_families.py [--device cuda] [--families fcos,yolov8n,retinanet]
        [--seeds 0,1]                 # data seeds (default: each recipe's own)
        [--dense fcos=dense.pt ...]   # reuse a dense model trained with the recipe's train section

A family whose sweep stopped before its report (killed, out of time) is merged from its
``state.json``: the finished variants only, marked "partial" in the table, without the bench columns.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {
    "fcos": "recipes/recovery_fcos.yaml",
    "yolov8n": "recipes/recovery_yolov8n.yaml",
    "retinanet": "recipes/recovery_retinanet.yaml",
    "yolo11n": "recipes/recovery_yolo11n.yaml",
    "yolo26n": "recipes/recovery_yolo26n.yaml",
}
COLUMNS = ("family", "model", "data_seed", "technique", "target_macs", "achieved_macs_ratio", "target_met", "map_pruned",
           "map_recovered", "map_sparse", "map_retrained", "dense_control_map", "retained_map", "retrain_steps",
           "sparse_steps", "retrain_seconds", "device")


def own_seed(recipe: str) -> int:
    """The data seed the family recipe names (0 when it names none: the synthetic set's default)."""
    return int((yaml.safe_load((ROOT / recipe).read_text()).get("data") or {}).get("seed", 0))


def family_recipe(recipe: str, out: Path, dense: str | None, seed: int | None = None) -> Path:
    """The family's recipe, or a copy beside ``out`` with what differs: ``seed`` (a data seed other
    than the recipe's own) replaces ``data.seed``; ``dense`` (a checkpoint trained with the recipe's
    own train section) sets ``model.weights``, so the sweep skips the dense training."""
    path = ROOT / recipe
    changes = {}
    if dense is not None:
        changes["model.weights"] = str(Path(dense).resolve())
    if seed is not None and seed != own_seed(recipe):
        changes["data.seed"] = seed
    if not changes:
        return path
    doc = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        section, field = key.split(".")
        doc.setdefault(section, {})[field] = value
    derived = out.parent / f"{out.name}.recipe.yaml"
    derived.parent.mkdir(parents=True, exist_ok=True)
    what = ", ".join(f"{k}: {dense if k == 'model.weights' else v}" for k, v in changes.items())
    _write_atomic(derived, f"# {recipe} with {what} (written by recovery_families.py)\n"
                  + yaml.safe_dump(doc, sort_keys=False))
    return derived


def seed_runs(family: str, out_root: Path, seeds: list[int] | None, dense: str | None) -> list[tuple[int, Path, Path]]:
    """``(data seed, recipe, sweep folder)`` per seed of ``family``: ``OUT/<family>`` when only the
    recipe's own seed runs (``seeds`` None or just that one, the layout of earlier runs, so they
    resume), else ``OUT/<family>/seed<N>`` each. A dense checkpoint belongs to the data it was
    trained on: ``dense`` goes to the recipe's own seed only."""
    recipe = FAMILIES[family]
    own = own_seed(recipe)
    seeds = [own] if seeds is None else seeds
    runs = []
    for seed in seeds:
        out = out_root / family if seeds == [own] else out_root / family / f"seed{seed}"
        runs.append((seed, family_recipe(recipe, out, dense if seed == own else None, seed), out))
    return runs


def run_family(recipe: Path, out: Path, device: str) -> bool:
    """One family's sweep (resumable); False if it failed, so the other families still run."""
    cmd = [sys.executable, "-m", "surgery", "sweep", str(recipe), "--out", str(out), "--device", device]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode == 0


def collect(family: str, folder: Path, device: str) -> tuple[list[dict[str, str]], bool]:
    """The family's rows and whether they are complete: from ``results.csv`` when the sweep wrote
    its report after its last step, else from ``state.json`` (the finished variants only)."""
    results, state = folder / "results.csv", folder / "state.json"
    if results.is_file() and not (state.is_file() and state.stat().st_mtime > results.stat().st_mtime):
        return family_rows(family, results, device), True
    if state.is_file():
        return partial_rows(family, state, device), False
    return [], False


def partial_rows(family: str, state: Path, device: str) -> list[dict[str, str]]:
    """Rows of a sweep stopped before its report, from the finished steps of its ``state.json``:
    a variant counts once its retraining finished. No bench ran, so MACs come from the pruned
    checkpoint's plan and the size/latency columns stay empty."""
    # imported here: torch loads only when a partial family needs it, merging finished sweeps does not
    from surgery.sweep_table import MIN_REFERENCE_MAP, TARGET_TOL, kept_macs

    steps = json.loads(state.read_text())["steps"]
    done = lambda step: step in steps and not steps[step].get("started")  # noqa: E731
    control = steps["control"]["mAP"] if done("control") else None
    # the report's rule: a control below the floor makes "retained" noise, so it is left empty
    reference = control if control is not None and control >= MIN_REFERENCE_MAP else None
    rows = []
    for step in steps:
        name = step.removesuffix(":retrain")
        if step == name or "-keep-macs" not in name or not (done(step) and done(f"{name}:prune")):
            continue
        technique, tag = name.rsplit("-keep-macs", 1)
        target, pr, rt = float(tag), steps[f"{name}:prune"], steps[step]
        sparse = steps.get(f"{name}:sparse") if done(f"{name}:sparse") else None
        achieved = kept_macs(state.parent / f"{name}.pruned.pt")
        rows.append({
            "family": family, "model": "", "data_seed": "", "technique": technique, "target_macs": tag,
            "achieved_macs_ratio": f"{achieved:.4f}", "target_met": str(abs(achieved / target - 1.0) <= TARGET_TOL),
            "map_pruned": f"{pr['mAP']:.4f}", "map_recovered": _num(pr.get("mAP_recovered")),
            "map_sparse": _num(sparse and sparse["mAP"]), "map_retrained": f"{rt['mAP']:.4f}",
            "dense_control_map": _num(control), "retained_map": _num(reference and rt["mAP"] / reference),
            "retrain_steps": str(int(rt["steps"]) + int(sparse["steps"] if sparse else 0)),
            "sparse_steps": str(int(sparse["steps"])) if sparse else "",
            "retrain_seconds": f"{float(rt.get('seconds', 0.0)) + float(sparse.get('seconds', 0.0) if sparse else 0.0):.1f}",
            "device": device,
        })
    return rows


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def family_rows(family: str, results: Path, device: str) -> list[dict[str, str]]:
    rows = []
    with open(results, newline="") as f:
        for r in csv.DictReader(f):
            if not r["method"].startswith("structured-"):
                continue
            technique = r["method"].removeprefix("structured-")
            rows.append({
                "family": family, "model": "", "data_seed": "", "technique": technique, "device": device,
                **{k: r.get(k, "") for k in COLUMNS if k not in ("family", "model", "data_seed", "technique", "device")},
            })
    model = _model_name(results.parent)
    for r in rows:
        r["model"] = model
    return rows


def _model_name(folder: Path) -> str:
    md = folder / "results.md"
    first = md.read_text().splitlines()[0] if md.is_file() else ""
    # "# ultralytics:yolov8n.yaml: structured vs masked pruning": the name may hold a colon itself
    return first.removeprefix("# ").rsplit(": ", 1)[0] if first.startswith("# ") else ""


def _f(x: str, pct: bool = False) -> str:
    if x in ("", None):
        return "-"
    v = float(x)
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


TARGETS = (0.5, 0.25)  # MACs kept: the 50% and 75% cuts


def _values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in ("", None)]


def _mean(rows: list[dict[str, str]], key: str) -> str:
    """The mean of ``key`` over the rows (one per data seed) that have it, '-' when none has."""
    vals = _values(rows, key)
    return _f(str(sum(vals) / len(vals))) if vals else "-"


def _spread(rows: list[dict[str, str]], key: str, pct: bool = False) -> str:
    """One seed: the value as today. Several: the mean, the min-max range and how many seeds it
    covers, e.g. ``91.2% (89.6-92.8, 2 seeds)`` (``1 of 2 seeds`` when a seed lacks the value)."""
    vals = _values(rows, key)
    if not vals:
        return "-"
    mean = _f(str(sum(vals) / len(vals)), pct)
    if len(rows) == 1:
        return mean
    n = f"{len(vals)} seeds" if len(vals) == len(rows) else f"{len(vals)} of {len(rows)} seeds"
    if len(vals) == 1:
        return f"{mean} ({n})"
    lo, hi = (_f(str(v), pct).removesuffix("%") for v in (min(vals), max(vals)))
    return f"{mean} ({lo}-{hi}, {n})"


def _misses(rows: list[dict[str, str]]) -> str:
    """The note after a retained cell whose MACs target was missed (on which seeds, when several)."""
    missed = [r for r in rows if r.get("target_met") == "False"]
    notes = [f"MACs {_f(r['achieved_macs_ratio'])}" if r.get("achieved_macs_ratio") else "target missed"
             for r in missed]
    if len(rows) > 1:
        notes = [f"{n} on seed {r.get('data_seed') or '?'}" for n, r in zip(notes, missed, strict=True)]
    return f" ({'; '.join(notes)})" if notes else ""


def markdown(rows: list[dict[str, str]], partial: frozenset[str] = frozenset()) -> str:
    """The README table: one line per family and technique, the 50% then the 75% MACs cut; the
    best measured technique per family and cut below it (the highest retained mAP). Rows of several
    data seeds (``data_seed``) share a cell: the mean, with the min-max range of the recovered and
    the retained mAP."""
    lines = ["| family | technique | 50% cut: mAP cut | recovered | retrained | retained | "
             "75% cut: mAP cut | recovered | retrained | retained |", "|---|---|" + "---:|" * 8]
    keyed: dict[tuple[str, str], dict[float, list[dict[str, str]]]] = {}
    for r in rows:
        keyed.setdefault((r["family"], r["technique"]), {}).setdefault(round(float(r["target_macs"]), 4), []).append(r)
    for (family, technique), by_target in keyed.items():
        cells = []
        for t in TARGETS:
            rs = by_target.get(t)
            if not rs:
                cells += ["-"] * 4
                continue
            cells += [_mean(rs, "map_pruned"), _spread(rs, "map_recovered"), _mean(rs, "map_retrained"),
                      _spread(rs, "retained_map", pct=True) + _misses(rs)]
        label = f"{family} (partial)" if family in partial else family
        lines.append(f"| {label} | {technique} | " + " | ".join(cells) + " |")
    controls: dict[str, dict[str, str]] = {}
    for r in rows:
        if r.get("dense_control_map"):
            controls.setdefault(r["family"], {})[r.get("data_seed", "")] = r["dense_control_map"]
    note = "; ".join(f"{f}: " + ", ".join(f"{float(m):.3f}" + (f" (seed {s})" if len(by_s) > 1 else "")
                                          for s, m in by_s.items()) for f, by_s in controls.items())
    text = "\n".join(lines) + f"\n\nDense control mAP (the 100% of 'retained'): {note}.\n"
    several = any(len(rs) > 1 for by_t in keyed.values() for rs in by_t.values())
    if several:
        seeds = sorted({r.get("data_seed", "") for r in rows} - {""}, key=int)
        text += (f"Over data seeds {', '.join(seeds)}: each cell is the mean over the seeds; recovered and retained "
                 "add the min-max range and how many seeds it covers.\n")
    best = best_techniques(rows)
    if best:
        text += "Best measured technique (highest retained" + (", mean over seeds" if several else "") + "): " + "; ".join(
            f"{family} {', '.join(f'{100 * (1 - t):.0f}% cut {tech}' for t, tech in by_t.items())}"
            for family, by_t in best.items()) + ".\n"
    if partial:
        text += (f"Partial ({', '.join(sorted(partial))}): the sweep stopped before its report; "
                 "only its finished variants are shown.\n")
    return text


def best_techniques(rows: list[dict[str, str]]) -> dict[str, dict[float, str]]:
    """Per family and MACs target, the technique with the highest retained mAP (the mean over data
    seeds), among those that met the target on every seed."""
    scores: dict[tuple[str, float, str], list[float]] = {}
    missed: set[tuple[str, float, str]] = set()
    for r in rows:
        key = (r["family"], round(float(r["target_macs"]), 4), r["technique"])
        if r.get("target_met") == "False":
            missed.add(key)
        elif r.get("retained_map"):
            scores.setdefault(key, []).append(float(r["retained_map"]))
    best: dict[str, dict[float, tuple[float, str]]] = {}
    for (family, t, technique), vals in scores.items():
        v = sum(vals) / len(vals)
        if (family, t, technique) not in missed and v > best.setdefault(family, {}).get(t, (-1.0, ""))[0]:
            best[family][t] = (v, technique)
    return {f: {t: by_t[t][1] for t in TARGETS if t in by_t} for f, by_t in best.items()}


def write_outputs(rows: list[dict[str, str]], csv_path: Path, md_path: Path, partial: frozenset[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _write_atomic(csv_path, buf.getvalue())
    md = markdown(rows, partial)
    _write_atomic(md_path, md)
    return md


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,1`` as a list of distinct non-negative integers (None: the recipes' own seeds)."""
    if text is None:
        return None
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        sys.exit(f"error: --seeds {text!r}: expected comma-separated integers, e.g. 0,1")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        sys.exit(f"error: --seeds {text!r}: expected distinct non-negative integers")
    return seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda (passed to every sweep)")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {', '.join(FAMILIES)}")
    ap.add_argument("--out", default="runs/recovery",
                    help="one sweep folder per family below this (OUT/FAMILY; OUT/FAMILY/seedN with --seeds)")
    ap.add_argument("--seeds", default=None, metavar="N,N",
                    help="data seeds, comma-separated: one sweep per family and seed, each on a copy of the recipe "
                         "with data.seed N, in OUT/FAMILY/seedN (default: the recipe's own data.seed only, in "
                         "OUT/FAMILY, as is --seeds with that one seed); the table gives the mean over the seeds and the range")
    ap.add_argument("--csv", default="benchmarks/recovery_families.csv")
    ap.add_argument("--md", default="benchmarks/recovery_families.md")
    ap.add_argument("--dense", action="append", default=[], metavar="FAMILY=CKPT",
                    help="reuse a dense checkpoint trained with the family recipe's train and data sections; "
                         "a dense model belongs to the data it was trained on, so only the recipe's own data.seed "
                         "uses it (the other --seeds train their own)")
    ap.add_argument("--collect-only", action="store_true", help="only merge sweeps already run")
    args = ap.parse_args()
    families = args.families.split(",")
    dense = dict(d.split("=", 1) for d in args.dense if "=" in d)
    for family in [*families, *dense]:
        if family not in FAMILIES:
            sys.exit(f"error: unknown family {family!r}: expected one of {', '.join(FAMILIES)}")
    seeds = parse_seeds(args.seeds)
    for family in dense:
        if seeds is not None and own_seed(FAMILIES[family]) not in seeds:
            sys.exit(f"error: --dense {family}: the checkpoint belongs to data seed {own_seed(FAMILIES[family])} "
                     f"({FAMILIES[family]}), which --seeds {args.seeds} leaves out")
    rows: list[dict[str, str]] = []
    partial: set[str] = set()
    failed = []
    for family in families:
        model = yaml.safe_load((ROOT / FAMILIES[family]).read_text())["model"]["name"]
        for seed, recipe, out in seed_runs(family, Path(args.out), seeds, dense.get(family)):
            if not args.collect_only and not run_family(recipe, out, args.device):
                failed.append(f"{family} (data seed {seed})")
            got, complete = collect(family, out, args.device)
            rows += [{**r, "model": r["model"] or model, "data_seed": str(seed)} for r in got]
            if got and not complete:
                partial.add(family)
    print(write_outputs(rows, Path(args.csv), Path(args.md), frozenset(partial)))
    print(f"wrote {args.csv} and {args.md}")
    if failed:
        sys.exit(f"error: the sweep of {', '.join(failed)} failed (rerun to resume it)")


if __name__ == "__main__":
    main()
