"""Cross-family accuracy-recovery benchmark (`make recovery`): one sweep per family, one table.

For each family recipe (``recipes/recovery_<family>.yaml``: the quickstart FCOS, YOLOv8n, a slim
anchor-based RetinaNet) run ``surgery sweep`` (resumable: a rerun reuses finished steps) into
``OUT/<family>``, then merge every structured variant's row into one CSV with a fixed schema and a
README-ready markdown table: mAP right after the cut, after recovery without retraining
(``map_recovered``, when the sweep wrote that column), after the equal retraining budget, and the
fraction of the dense control's mAP retained, at 50% and 75% MACs cuts, per technique.

    python benchmarks/recovery_families.py [--device cuda] [--families fcos,yolov8n,retinanet]
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
COLUMNS = ("family", "model", "technique", "target_macs", "achieved_macs_ratio", "target_met", "map_pruned",
           "map_recovered", "map_sparse", "map_retrained", "dense_control_map", "retained_map", "retrain_steps",
           "sparse_steps", "retrain_seconds", "device")


def family_recipe(recipe: str, out: Path, dense: str | None) -> Path:
    """The family's recipe, or (``dense``: a checkpoint trained with the recipe's own train section)
    a copy beside ``out`` whose ``model.weights`` loads it, so the sweep skips the dense training."""
    path = ROOT / recipe
    if dense is None:
        return path
    doc = yaml.safe_load(path.read_text())
    doc["model"]["weights"] = str(Path(dense).resolve())
    derived = out.parent / f"{out.name}.recipe.yaml"
    derived.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(derived, f"# {recipe} with model.weights: {dense} (written by recovery_families.py)\n"
                  + yaml.safe_dump(doc, sort_keys=False))
    return derived


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
            "family": family, "model": "", "technique": technique, "target_macs": tag,
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
                "family": family, "model": "", "technique": technique, "device": device,
                **{k: r.get(k, "") for k in COLUMNS if k not in ("family", "model", "technique", "device")},
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


def markdown(rows: list[dict[str, str]], partial: frozenset[str] = frozenset()) -> str:
    """The README table: one line per family and technique, the 50% then the 75% MACs cut; the
    best measured technique per family and cut below it (the highest retained mAP)."""
    lines = ["| family | technique | 50% cut: mAP cut | recovered | retrained | retained | "
             "75% cut: mAP cut | recovered | retrained | retained |", "|---|---|" + "---:|" * 8]
    keyed: dict[tuple[str, str], dict[float, dict[str, str]]] = {}
    for r in rows:
        keyed.setdefault((r["family"], r["technique"]), {})[round(float(r["target_macs"]), 4)] = r
    for (family, technique), by_target in keyed.items():
        cells = []
        for t in TARGETS:
            r = by_target.get(t)
            if r is None:
                cells += ["-"] * 4
                continue
            miss = ""
            if r.get("target_met") == "False":
                miss = f" (MACs {_f(r['achieved_macs_ratio'])})" if r.get("achieved_macs_ratio") else " (target missed)"
            cells += [_f(r["map_pruned"]), _f(r.get("map_recovered", "")), _f(r["map_retrained"]),
                      _f(r["retained_map"], pct=True) + miss]
        label = f"{family} (partial)" if family in partial else family
        lines.append(f"| {label} | {technique} | " + " | ".join(cells) + " |")
    controls = {r["family"]: r["dense_control_map"] for r in rows}
    note = "; ".join(f"{f}: {float(m):.3f}" for f, m in controls.items() if m)
    text = "\n".join(lines) + f"\n\nDense control mAP (the 100% of 'retained'): {note}.\n"
    best = best_techniques(rows)
    if best:
        text += "Best measured technique (highest retained): " + "; ".join(
            f"{family} {', '.join(f'{100 * (1 - t):.0f}% cut {tech}' for t, tech in by_t.items())}"
            for family, by_t in best.items()) + ".\n"
    if partial:
        text += (f"Partial ({', '.join(sorted(partial))}): the sweep stopped before its report; "
                 "only its finished variants are shown.\n")
    return text


def best_techniques(rows: list[dict[str, str]]) -> dict[str, dict[float, str]]:
    """Per family and MACs target, the technique with the highest retained mAP (target met)."""
    best: dict[str, dict[float, tuple[float, str]]] = {}
    for r in rows:
        if not r.get("retained_map") or r.get("target_met") == "False":
            continue
        t, v = round(float(r["target_macs"]), 4), float(r["retained_map"])
        if v > best.setdefault(r["family"], {}).get(t, (-1.0, ""))[0]:
            best[r["family"]][t] = (v, r["technique"])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda (passed to every sweep)")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {', '.join(FAMILIES)}")
    ap.add_argument("--out", default="runs/recovery", help="one sweep folder per family below this")
    ap.add_argument("--csv", default="benchmarks/recovery_families.csv")
    ap.add_argument("--md", default="benchmarks/recovery_families.md")
    ap.add_argument("--dense", action="append", default=[], metavar="FAMILY=CKPT",
                    help="reuse a dense checkpoint trained with the family recipe's train and data sections")
    ap.add_argument("--collect-only", action="store_true", help="only merge sweeps already run")
    args = ap.parse_args()
    families = args.families.split(",")
    dense = dict(d.split("=", 1) for d in args.dense if "=" in d)
    for family in [*families, *dense]:
        if family not in FAMILIES:
            sys.exit(f"error: unknown family {family!r}: expected one of {', '.join(FAMILIES)}")
    rows: list[dict[str, str]] = []
    partial: set[str] = set()
    failed = []
    for family in families:
        out = Path(args.out) / family
        if not args.collect_only and not run_family(family_recipe(FAMILIES[family], out, dense.get(family)), out,
                                                    args.device):
            failed.append(family)
        got, complete = collect(family, out, args.device)
        model = yaml.safe_load((ROOT / FAMILIES[family]).read_text())["model"]["name"]
        rows += [{**r, "model": r["model"] or model} for r in got]
        if got and not complete:
            partial.add(family)
    print(write_outputs(rows, Path(args.csv), Path(args.md), frozenset(partial)))
    print(f"wrote {args.csv} and {args.md}")
    if failed:
        sys.exit(f"error: the sweep of {', '.join(failed)} failed (rerun to resume it)")


if __name__ == "__main__":
    main()
