"""The main job: structured vs masked pruning, measured side by side, from one recipe.

1. Train (or load) the dense baseline.
2. A **dense control** gets the same retraining budget as every pruned variant; "retained mAP" is
   measured against it. Without it a sweep credits pruning with what the extra, low-learning-rate
   fine-tune gives any model (on the synthetic task a 50%-masked model fine-tuned for 2 minutes
   beat its own under-annealed baseline exactly as much as the dense model given the same
   fine-tune did).
3. For each channel ratio: prune (structured), eval, retrain, eval. For masked pruning: the same
   *parameter reduction* as each ratio (the non-zeros equal the pruned model's parameters) plus the
   recipe's sparsities: prune, eval, retrain with masks kept, eval.
4. Bench every final model (masks folded into plain weights), interleaved.
5. ``results.csv``, ``results.md`` (the seed studies' table), ``bench.csv`` and PNG plots.

Every finished step is recorded in ``state.json`` (written atomically); re-running the sweep skips
finished steps, and an interrupted training step resumes from its last checkpoint.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_open
from .bench import bench_checkpoints, write_csv
from .checkpoint import is_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .deploy import deploy_report
from .distill import FeatureImitation
from .evaluate import evaluate
from .hooks import LoggingHook
from .masked import prunable_parameters
from .models import ModelSpec, accepts, build_model, get_builder
from .plan import plan_chain
from .recipe import DistillSection, PruneSection, Recipe, Technique, parse_technique
from .report import (
    MIN_REFERENCE_MAP,
    markdown_table,
    plot_detections_grid,
    plot_latency_vs_ratio,
    plot_layer_widths,
    plot_map_vs_macs,
)
from .safety import RunLock, check_folder
from .settings import StepKeys
from .train import build_trainer
from .workflows import load_datasets, prune_loaded

SWEEP_COLUMNS: tuple[str, ...] = (
    "variant", "method", "ratio", "target_macs", "sparsity", "params", "params_nonzero", "size_mb", "size_gzip_mb",
    "macs", "latency_ms", "latency_ms_p90",
    "params_ratio", "macs_ratio", "latency_ratio", "network_ms", "network_ratio", "map_pruned", "map50_pruned", "map_retrained",
    "map50_retrained", "dense_map", "dense_control_map", "retained_map", "retrain_steps", "retrain_seconds", "input_size",
    "threads", "torch", "checkpoint",
)


@dataclass
class SweepResult:
    out: Path
    rows: list[dict[str, Any]]
    csv: Path
    markdown: Path
    bench_csv: Path
    plots: dict[str, Path]
    seconds: float
    skipped: list[str] = field(default_factory=list)  # steps found finished from an earlier run

    @property
    def warnings(self) -> list[str]:
        """What makes the table misleading (a dense reference too weak for retained mAP)."""
        ref = next((r.get("dense_control_map") for r in self.rows if r.get("dense_control_map") is not None), None)
        if ref is not None and ref < MIN_REFERENCE_MAP:
            return [f"the dense reference reaches mAP {ref:.3f} (< {MIN_REFERENCE_MAP}): 'retained' is not shown; "
                    "train the dense model longer before comparing pruning methods"]
        return []


class _State:
    """``state.json``: finished steps and what they produced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"steps": {}}
        if path.is_file():
            try:
                self.data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.data = {"steps": {}}
            if not isinstance(self.data, dict) or not isinstance(self.data.get("steps"), dict):
                self.data = {"steps": {}}  # damaged: every step is redone

    def get(self, step: str, key: str | None = None) -> dict[str, Any] | None:
        """The finished step, if it was produced by the same settings (``key``); a step produced by
        other settings is forgotten and its files removed, so it and everything after it is redone."""
        entry = self.data["steps"].get(step)
        if entry is None:
            return None
        if key is not None and entry.get("key") != key:
            self._forget(step)
            return None
        if entry.get("started"):
            return None  # interrupted: its training resumes from its checkpoint
        files = [Path(f) for f in entry.get("files", [])]
        return entry if all(f.is_file() for f in files) else None

    def _forget(self, step: str) -> None:
        entry = self.data["steps"].pop(step, None) or {}
        for f in entry.get("files", []):
            Path(f).unlink(missing_ok=True)

    def begin(self, step: str, key: str, files: list[Path]) -> None:
        """Mark ``step`` as started with settings ``key``; stale files of other settings are removed."""
        entry = self.data["steps"].get(step)
        if entry is None or entry.get("key") != key:
            for f in files:
                f.unlink(missing_ok=True)
        self.data["steps"][step] = {"started": True, "key": key, "files": [str(f) for f in files]}
        self._write()

    def put(self, step: str, result: dict[str, Any], files: list[Path], key: str | None = None) -> None:
        self.data["steps"][step] = {**result, "files": [str(f) for f in files], **({"key": key} if key else {})}
        self._write()

    def _write(self) -> None:
        with atomic_open(self.path, "w") as f:
            json.dump(self.data, f, indent=1)


def _ratio_tag(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".")


def matched_sparsity(model: torch.nn.Module, params_target: int) -> float:
    """Masked-pruning sparsity whose non-zero count equals ``params_target`` (conv and linear
    weights are masked; biases and norms stay)."""
    total = sum(p.numel() for p in model.parameters())
    maskable = sum(p.numel() for p in prunable_parameters(model).values())
    s = (total - params_target) / max(1, maskable)
    return float(min(0.99, max(0.01, round(s, 3))))


def run_sweep(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    on_stage: Callable[[str, int, int], None] | None = None,
    on_step: Callable[[Any], None] | None = None,
) -> SweepResult:
    """Run (or resume) the whole sweep the recipe describes; see the module docstring. The run
    folder is locked: a second sweep on it refuses instead of mixing results."""
    folder = check_folder(Path(out or recipe.sweep.out), what="sweep folder")
    with RunLock(folder, "sweep folder"):
        return _run_sweep(recipe, folder, device=device, on_stage=on_stage, on_step=on_step)


def _run_sweep(
    recipe: Recipe,
    out: Path,
    *,
    device: str,
    on_stage: Callable[[str, int, int], None] | None,
    on_step: Callable[[Any], None] | None,
) -> SweepResult:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out / "state.json")
    skipped: list[str] = []

    default = recipe.prune.method if recipe.prune.method != "magnitude" else "l1"
    techniques = [parse_technique(t) for t in (recipe.sweep.techniques or [default])]
    rounds_of = {t.text: (max(1, recipe.prune.steps) if t.progressive else 1) for t in techniques}
    points: list[tuple[str, dict[str, Any]]] = [(_ratio_tag(r), {"ratio": r}) for r in recipe.sweep.ratios]
    points += [(f"macs{_ratio_tag(t)}", {"target_macs": t}) for t in recipe.sweep.target_macs]
    n_struct = sum(rounds_of[t.text] for t in techniques) * len(points)
    n_masked = len(points) * int(recipe.sweep.match_masked) + len(recipe.sweep.sparsities)
    total_stages = 5 + 2 * n_struct + 2 * n_masked + int(recipe.sweep.int8 != "none")
    stage_i = 0

    def stage(name: str) -> None:
        nonlocal stage_i
        stage_i += 1
        if on_stage:
            on_stage(name, stage_i, total_stages)

    stage("data")
    train_set, val_set = load_datasets(recipe, hflip=recipe.train.hflip)

    def score(model: torch.nn.Module) -> dict[str, float]:
        m = evaluate(model, val_set, batch_size=8, device=device).metrics
        return {"mAP": float(m["mAP"]), "mAP50": float(m["mAP50"])}

    def train(model, spec, cfg, path: Path, *, kind: str, plan=None, masks=None, distill=False) -> dict[str, Any]:
        hooks = [LoggingHook(on_step)] if on_step else []
        if distill:
            dcfg = recipe.retrain.distill if recipe.retrain.distill is not None else DistillSection()
            dcfg = dataclasses.replace(dcfg, type="imitation")
            hooks.append(FeatureImitation(load_checkpoint(dense_path)[0], model, dcfg, teacher_path=str(dense_path)))
        trainer = build_trainer(model, spec, train_set, cfg, out=path, hooks=hooks, device=device, kind=kind,
                                plan=plan, masks=masks, recipe=recipe)
        res = trainer.train(resume=path.is_file())
        return {"steps": res.steps, "seconds": res.seconds, "s_per_step": res.s_per_step}

    # 1. dense baseline -------------------------------------------------------------------------
    spec = ModelSpec(recipe.model.name, {**recipe.model.kwargs})
    if "num_classes" not in spec.kwargs and accepts(get_builder(spec.name), "num_classes"):
        spec.kwargs["num_classes"] = train_set.num_classes  # (Ultralytics models take nc: the recipe sets it)
    dense_path = out / "dense.pt"
    stage("dense baseline")
    keys = StepKeys(recipe)
    dense = state.get("dense", keys.dense)
    if dense is None:
        state.begin("dense", keys.dense, [dense_path])
        if recipe.model.weights and is_checkpoint(recipe.model.weights):
            model, ck = load_checkpoint(recipe.model.weights)
            spec = ck.spec
            save_checkpoint(dense_path, model, spec, kind="dense", recipe=recipe.to_dict())
            info = {"steps": 0, "seconds": 0.0, "source": str(recipe.model.weights)}
        else:
            torch.manual_seed(recipe.train.seed)  # the same initial weights on every run
            model = build_model(spec, weights=recipe.model.weights) if recipe.model.weights else build_model(spec)
            info = train(model, spec, recipe.train, dense_path, kind="dense")
            model, _ = load_checkpoint(dense_path)
        dense = {**info, **score(model)}
        state.put("dense", dense, [dense_path], keys.dense)
    else:
        skipped.append("dense")

    # 2. dense control: the same retraining budget ---------------------------------------------
    control_path = out / "control.pt"
    stage("dense control (same retraining as every variant)")
    control = state.get("control", keys.control)
    if control is None:
        state.begin("control", keys.control, [control_path])
        model, ck = load_checkpoint(dense_path)
        info = train(model, ck.spec, recipe.retrain, control_path, kind="dense")
        control = {**info, **score(load_checkpoint(control_path)[0])}
        state.put("control", control, [control_path], keys.control)
    else:
        skipped.append("control")

    # 3. variants -----------------------------------------------------------------------------
    def run_variant(name: str, method: str, point: dict[str, Any], prune: Callable[[int], dict[str, Any]],
                    rounds: int = 1, distill: bool = False) -> dict[str, Any]:
        """``rounds`` x (prune with ``prune(round)`` + eval, retrain + eval), each step resumable;
        the retraining budget is split over the rounds (the same total for every variant)."""
        source, seconds = dense_path, 0.0
        for k in range(1, rounds + 1):
            key = name if k == rounds else f"{name}.r{k}"
            pruned_path, retrained_path = out / f"{key}.pruned.pt", out / f"{key}.pt"
            stage(f"{key}: prune + eval")
            kp, kr = keys.prune(key), keys.retrain(key)
            pr = state.get(f"{key}:prune", kp)
            if pr is None:
                state.begin(f"{key}:prune", kp, [pruned_path])
                model, ck = load_checkpoint(source)
                rec = copy.deepcopy(recipe)
                rec.prune = PruneSection(**{**vars(recipe.prune), **prune(k)})
                done = prune_loaded(model, ck.spec, ck if k > 1 else None, rec, pruned_path, source=str(source),
                                    macs_input_size=recipe.bench.input_size if "ratio" not in point else None)
                if done.masked is not None:
                    counts = {"params": done.masked.total_params, "params_nonzero": done.masked.nonzeros_after}
                else:
                    counts = {"params": done.structured.report.params_after}
                pr = {**counts, **score(model)}
                state.put(f"{key}:prune", pr, [pruned_path], kp)
            else:
                skipped.append(f"{key}:prune")
            stage(f"{key}: retrain + eval")
            rt = state.get(f"{key}:retrain", kr)
            steps = recipe.retrain.steps // rounds + (recipe.retrain.steps % rounds if k == rounds else 0)
            if rt is None:
                state.begin(f"{key}:retrain", kr, [retrained_path])
                model, ck = load_checkpoint(pruned_path)  # masks of masked variants are kept while training
                cfg = dataclasses.replace(recipe.retrain, steps=steps, epochs=None)
                info = train(model, ck.spec, cfg, retrained_path, kind=ck.kind, plan=ck.plan, masks=ck.masks,
                             distill=distill)
                rt = {**info, **score(load_checkpoint(retrained_path)[0])}
                state.put(f"{key}:retrain", rt, [retrained_path], kr)
            else:
                skipped.append(f"{key}:retrain")
            seconds += float(rt.get("seconds", 0.0))
            source = retrained_path
        ratio = point.get("ratio")
        if ratio is None and "target_macs" in point:  # the channel ratio the search found (all rounds)
            kept = 1.0
            for p in plan_chain(read_checkpoint(out / f"{name}.pruned.pt").plan):
                kept *= 1.0 - p.ratio
            ratio = round(1.0 - kept, 4)
        return {"variant": name, "method": method, "ratio": ratio, "sparsity": point.get("sparsity"),
                "target_macs": point.get("target_macs"), "pruned": pr, "retrained": {**rt, "seconds": seconds},
                "checkpoint": source, "pruned_path": out / f"{name}.pruned.pt"}

    def structured_round(tech: Technique, point: dict[str, Any], rounds: int, name: str):
        def prune(k: int) -> dict[str, Any]:
            args: dict[str, Any] = {"method": tech.criterion, "target_macs": None, "target_params": None}
            if "ratio" in point:  # each round keeps (1 - r)^(1/rounds) of the channels left
                args["ratio"] = 1.0 - (1.0 - point["ratio"]) ** (1.0 / rounds)
            else:  # round k reaches target^(k/rounds) of the dense MACs
                kept = _kept_macs(out / f"{name}.r{k - 1}.pruned.pt") if k > 1 else 1.0
                args["target_macs"] = min(0.999, point["target_macs"] ** (k / rounds) / kept)
            return args

        return prune

    variants = []
    for tech in techniques:
        for tag, point in points:
            name, rounds = f"{tech.text}-{tag}", rounds_of[tech.text]
            variants.append(run_variant(name, f"structured-{tech.text}", point,
                                        structured_round(tech, point, rounds, name), rounds, tech.distill))
    sparsities: list[float] = []
    if recipe.sweep.match_masked:
        probe = build_model(spec)
        first = [v for v in variants if v["method"] == f"structured-{techniques[0].text}"]
        sparsities = [matched_sparsity(probe, v["pruned"]["params"]) for v in first]
    sparsities += [s for s in recipe.sweep.sparsities if all(abs(s - x) > 1e-3 for x in sparsities)]
    variants += [run_variant(f"masked-{_ratio_tag(s)}", "masked", {"sparsity": s},
                             lambda k, s=s: {"method": "magnitude", "sparsity": s}) for s in sparsities]

    # 4. bench --------------------------------------------------------------------------------
    stage("bench (interleaved latency, MACs, sizes)")
    bench_csv = out / "bench.csv"
    paths = [control_path] + [v["checkpoint"] for v in variants]
    bench_rows = bench_checkpoints(paths, recipe.bench)
    write_csv(bench_rows, bench_csv)
    first_bs = recipe.bench.batch_sizes[0]
    by_ckpt = {Path(b.checkpoint).name: b for b in bench_rows if b.batch_size == first_bs}
    deploy_md = ""
    if recipe.sweep.int8 != "none":
        stage("deploy: INT8 in ONNX Runtime" + (" (PTQ and QAT)" if recipe.sweep.qat_steps else " (PTQ)"))
        structured = [v for v in variants if v["method"].startswith("structured")]
        if recipe.sweep.int8 == "smallest" and structured:
            structured = [min(structured, key=lambda v: by_ckpt[v["checkpoint"].name].macs)]
        deploy_md = deploy_report(recipe, out, [control_path] + [v["checkpoint"] for v in structured], val_set)

    # 5. report -------------------------------------------------------------------------------
    stage("report")
    rows = [_row("dense", "dense", None, None, by_ckpt[control_path.name], dense, control, dense, control,
                 control_path, recipe)]
    for v in variants:
        rows.append(_row(v["variant"], v["method"], v["ratio"], v["sparsity"], by_ckpt[v["checkpoint"].name],
                         v["pruned"], v["retrained"], dense, control, v["checkpoint"], recipe, v["target_macs"]))
    csv_path = out / "results.csv"
    _write_rows(rows, csv_path)
    md = out / "results.md"
    md.write_text(_markdown(rows, recipe, dense, control) + deploy_md)
    plots = _plots(rows, variants, out, val_set, control_path, recipe)
    return SweepResult(out=out, rows=rows, csv=csv_path, markdown=md, bench_csv=bench_csv, plots=plots,
                       seconds=time.perf_counter() - t_start, skipped=skipped)


def _kept_macs(pruned_path: Path) -> float:
    """Fraction of the dense MACs a (progressively) pruned checkpoint kept: the product over its
    plan chain of each cut's measured MACs ratio."""
    kept = 1.0
    for p in plan_chain(read_checkpoint(pruned_path).plan):
        kept *= getattr(p, "achieved_macs_ratio", None) or 1.0
    return kept


def _row(variant, method, ratio, sparsity, bench, pruned, retrained, dense, control, ckpt, recipe,
         target_macs=None) -> dict[str, Any]:
    # a dense reference below the floor makes the ratio noise ("retained 279.9%" at mAP 0.001)
    retained = retrained["mAP"] / control["mAP"] if (control.get("mAP") or 0.0) >= MIN_REFERENCE_MAP else None
    return {
        "variant": variant,
        "method": method,
        "ratio": ratio,
        "target_macs": target_macs,
        "sparsity": sparsity,
        "params": bench.params,
        "params_nonzero": bench.params_nonzero,
        "size_mb": round(bench.file_bytes / 1e6, 2),  # float32 weights as saved
        "size_gzip_mb": round(bench.file_gzip_bytes / 1e6, 2),  # what masked (zeroed) weights really cost
        "macs": bench.macs,
        "latency_ms": round(bench.latency_ms_median, 3),
        "latency_ms_p90": round(bench.latency_ms_p90, 3),
        "params_ratio": round(bench.params_ratio, 4),
        "macs_ratio": round(bench.macs_ratio, 4),
        "latency_ratio": round(bench.latency_ratio, 4),
        "network_ms": None if bench.network_ms_median is None else round(bench.network_ms_median, 3),
        "network_ratio": round(bench.network_ratio, 4),
        "map_pruned": round(pruned["mAP"], 4),
        "map50_pruned": round(pruned["mAP50"], 4),
        "map_retrained": round(retrained["mAP"], 4),
        "map50_retrained": round(retrained["mAP50"], 4),
        "dense_map": round(dense["mAP"], 4),
        "dense_control_map": round(control["mAP"], 4),
        "retained_map": None if retained is None else round(retained, 4),
        "retrain_steps": recipe.retrain.steps,
        "retrain_seconds": round(float(retrained.get("seconds", 0.0)), 1),
        "input_size": recipe.bench.input_size,
        "threads": bench.threads,
        "torch": bench.torch,
        "checkpoint": str(ckpt),
    }


def _write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(SWEEP_COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in SWEEP_COLUMNS})


def _markdown(rows: list[dict[str, Any]], recipe: Recipe, dense: dict, control: dict) -> str:
    head = (
        f"# {recipe.model.name}: structured vs masked pruning\n\n"
        f"Dense baseline mAP@[.5:.95] {dense['mAP']:.3f} (mAP@0.5 {dense['mAP50']:.3f}); dense control after the same "
        f"{recipe.retrain.steps}-step retraining: {control['mAP']:.3f} ({control['mAP50']:.3f}). "
        f"'mAP pruned' is right after the cut, 'mAP retrained' after {recipe.retrain.steps} steps; retained = "
        f"retrained / dense control. Latency: median of {recipe.bench.runs} runs, batch {recipe.bench.batch_sizes[0]}, "
        f"{recipe.bench.input_size} px, {recipe.bench.threads} threads, {recipe.bench.device}; masked models with "
        "masks folded into plain weights. MACs: fvcore.\n\n"
    )
    table = markdown_table(rows)
    extra = ["", "| variant | MACs ratio | latency ratio | mAP@0.5 pruned | mAP@0.5 retrained |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        extra.append(f"| {r['variant']} | {r['macs_ratio']:.2f} | {r['latency_ratio']:.2f} | "
                     f"{r['map50_pruned']:.3f} | {r['map50_retrained']:.3f} |")
    study = ["", "In the weight-vs-filter study's form (rate: channels cut or weights zeroed; MB: weights, gzip):", "",
             "| pruning | rate | params | MB | MB gzip | mAP@0.5 after pruning | mAP@0.5 after retraining |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        rate = r.get("sparsity") if r.get("sparsity") is not None else r.get("ratio")
        kind = "weight" if r.get("sparsity") is not None else "filter"
        mb = " | ".join("" if r.get(k) is None else f"{r[k]:.2f}" for k in ("size_mb", "size_gzip_mb"))
        study.append(f"| {kind} ({r['variant']}) | {'' if rate is None else f'{rate:.0%}'} | {r['params']:,} | "
                     f"{mb} | {r['map50_pruned']:.3f} | {r['map50_retrained']:.3f} |")
    return head + table + "\n".join(extra + study) + "\n"


def _plots(rows, variants, out: Path, val_set, control_path: Path, recipe: Recipe) -> dict[str, Path]:
    plots = {
        "map_vs_macs": plot_map_vs_macs(rows, out / "map_vs_macs.png"),
        "latency_vs_ratio": plot_latency_vs_ratio(rows, out / "latency_vs_ratio.png"),
    }
    structured = [v for v in variants if v["method"].startswith("structured")]
    if structured:
        mid = min(structured, key=lambda v: abs(v["ratio"] - 0.5))
        plan = read_checkpoint(mid["pruned_path"]).plan
        plots["layer_widths"] = plot_layer_widths(plan.widths_before, plan.widths_after, out / "layer_widths.png")
        models = {"dense": control_path, f"{mid['variant']} pruned": mid["pruned_path"],
                  f"{mid['variant']} retrained": mid["checkpoint"]}
        masked = [v for v in variants if v["method"] == "masked"]
        if masked:
            mm = min(masked, key=lambda v: abs(v["sparsity"] - 0.75))
            models[f"{mm['variant']} retrained"] = mm["checkpoint"]
        n = min(4, len(val_set))
        images = [val_set[i][0] for i in range(n)]
        preds = {}
        for label, path in models.items():
            model = load_checkpoint(path)[0].eval()
            with torch.no_grad():
                preds[label] = model(images)
        plots["detections"] = plot_detections_grid(images, preds, out / "detections.png",
                                                   class_names=getattr(val_set, "class_names", None))
    return plots
