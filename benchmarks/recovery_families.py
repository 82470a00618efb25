"""Cross-family accuracy-recovery benchmark (`make recovery`): one sweep per family, one table.

For each family recipe (``recipes/recovery_<family>.yaml``: the quickstart FCOS, YOLOv8n, a slim
anchor-based RetinaNet) run ``surgery sweep`` (resumable: a rerun reuses finished steps) into
``OUT/<family>``, then merge every structured variant's row into one CSV with a fixed schema and a
README-ready markdown table: mAP right after the cut, after recovery without retraining
(``map_recovered``, when the sweep wrote that column), after the equal retraining budget, and the
fraction of the dense control's mAP retained, at 50% and 75% MACs cuts, per technique.

    python benchmarks/recovery_families.py [--device cuda] [--families fcos,yolov8n,retinanet]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {
    "fcos": "recipes/recovery_fcos.yaml",
    "yolov8n": "recipes/recovery_yolov8n.yaml",
    "retinanet": "recipes/recovery_retinanet.yaml",
}
COLUMNS = ("family", "model", "technique", "target_macs", "achieved_macs_ratio", "target_met", "map_pruned",
           "map_recovered", "map_sparse", "map_retrained", "dense_control_map", "retained_map", "retrain_steps",
           "sparse_steps", "retrain_seconds", "device")


def run_family(family: str, recipe: str, out: Path, device: str) -> Path:
    cmd = [sys.executable, "-m", "surgery", "sweep", str(ROOT / recipe), "--out", str(out), "--device", device]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / "results.csv"


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
    return first.removeprefix("# ").split(":")[0] if first.startswith("# ") else ""


def _f(x: str, pct: bool = False) -> str:
    if x in ("", None):
        return "-"
    v = float(x)
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def markdown(rows: list[dict[str, str]]) -> str:
    lines = ["| family | technique | 50% cut: mAP cut | recovered | retrained | retained | "
             "75% cut: mAP cut | recovered | retrained | retained |", "|---|---|" + "---:|" * 8]
    keyed: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for r in rows:
        keyed.setdefault((r["family"], r["technique"]), {})[r["target_macs"]] = r
    for (family, technique), by_target in keyed.items():
        cells = []
        for t in ("0.5", "0.25"):
            r = by_target.get(t)
            if r is None:
                cells += ["-"] * 4
                continue
            miss = "" if r.get("target_met") in ("True", "") else f" (MACs {float(r['achieved_macs_ratio']):.2f})"
            cells += [_f(r["map_pruned"]), _f(r.get("map_recovered", "")), _f(r["map_retrained"]),
                      _f(r["retained_map"], pct=True) + miss]
        lines.append(f"| {family} | {technique} | " + " | ".join(cells) + " |")
    controls = {r["family"]: r["dense_control_map"] for r in rows}
    note = "; ".join(f"{f}: {float(m):.3f}" for f, m in controls.items() if m)
    return "\n".join(lines) + f"\n\nDense control mAP (the 100% of 'retained'): {note}.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda (passed to every sweep)")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {', '.join(FAMILIES)}")
    ap.add_argument("--out", default="runs/recovery", help="one sweep folder per family below this")
    ap.add_argument("--csv", default="benchmarks/recovery_families.csv")
    ap.add_argument("--md", default="benchmarks/recovery_families.md")
    ap.add_argument("--collect-only", action="store_true", help="only merge sweeps already run")
    args = ap.parse_args()
    rows: list[dict[str, str]] = []
    for family in args.families.split(","):
        if family not in FAMILIES:
            sys.exit(f"error: unknown family {family!r}: expected one of {', '.join(FAMILIES)}")
        out = Path(args.out) / family
        results = out / "results.csv" if args.collect_only else run_family(family, FAMILIES[family], out, args.device)
        if results.is_file():
            rows += family_rows(family, results, args.device)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    Path(args.md).write_text(markdown(rows))
    print(markdown(rows))
    print(f"wrote {args.csv} and {args.md}")


if __name__ == "__main__":
    main()
