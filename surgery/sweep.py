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

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config.recipe import DistillSection, PruneSection, Recipe, SparsifySection, Technique, parse_technique
from .config.settings import StepKeys, settings_hash
from .deployment.table import deploy_report
from .detectors.builders import ModelSpec, accepts, build_model, get_builder
from .errors import RecipeError
from .measure.bench import bench_checkpoints, write_csv
from .measure.evaluate import evaluate
from .pruning.importance import needs_data
from .pruning.masked import matched_sparsity
from .pruning.plan import plan_chain
from .pruning.sparsify import SparsityHook
from .pruning.target import find_ratio_for_target
from .report import (
    MIN_REFERENCE_MAP,
    sweep_markdown,
)
from .storage.atomic import atomic_open
from .storage.checkpoint import is_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .storage.safety import RunLock, check_folder
from .sweep_state import StepState
from .sweep_table import (
    SWEEP_COLUMNS,
    TARGET_TOL,
    SweepRow,
    kept_macs,
    sweep_plots,
    sweep_row,
    target_columns,
    write_rows,
)
from .training.hooks import LoggingHook
from .training.train import build_trainer
from .workflows import distill_hook, load_datasets, prune_loaded


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
        out = [f"{r['variant']}: MACs target {r['target_macs']:.1%} not met within {TARGET_TOL:.0%}: the closest "
               f"the search found keeps {r['achieved_macs_ratio']:.1%} of the MACs (target_met=False in results.csv)"
               for r in self.rows if r.get("target_met") is False]
        if ref is not None and ref < MIN_REFERENCE_MAP:
            out.append(f"the dense reference reaches mAP {ref:.3f} (< {MIN_REFERENCE_MAP}): 'retained' is not shown; "
                       "train the dense model longer before comparing pruning methods")
        return out


def _ratio_tag(x: float) -> str:
    return f"{x:.3f}".rstrip("0").rstrip(".")


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


@dataclass
class _Run:
    """The sweep's state, which its steps (:data:`SWEEP_STEPS`) read and fill in turn."""

    recipe: Recipe
    out: Path
    device: str
    on_stage: Callable[[str, int, int], None] | None
    on_step: Callable[[Any], None] | None
    state: StepState
    techniques: list[Technique]
    points: list[tuple[str, dict[str, Any]]]
    rounds_of: dict[str, int]
    total_stages: int
    stage_i: int = 0
    skipped: list[str] = field(default_factory=list)
    keys: Any = None  # settings.StepKeys of the recipe
    train_set: Any = None
    val_set: Any = None
    spec: ModelSpec | None = None
    dense: dict[str, Any] = field(default_factory=dict)  # steps, seconds, mAP, mAP50
    control: dict[str, Any] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    bench_rows: list[Any] = field(default_factory=list)
    by_ckpt: dict[str, Any] = field(default_factory=dict)  # checkpoint file name -> its bench row
    deploy_md: str = ""
    result: SweepResult | None = None
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def dense_path(self) -> Path:
        return self.out / "dense.pt"

    @property
    def control_path(self) -> Path:
        return self.out / "control.pt"

    def finished(self, step: str, key: str) -> dict[str, Any] | None:
        """The stored result of ``step`` when an earlier run finished it with the same settings
        (``key``); it is then listed as skipped."""
        done = self.state.get(step, key)
        if done is not None:
            self.skipped.append(step)
        return done

    def stage(self, name: str) -> None:
        self.stage_i += 1
        if self.on_stage:
            self.on_stage(name, self.stage_i, self.total_stages)

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        m = evaluate(model, self.val_set, batch_size=8, device=self.device).metrics
        return {"mAP": float(m["mAP"]), "mAP50": float(m["mAP50"])}

    def train(self, model, spec, cfg, path: Path, *, kind: str, plan=None, masks=None, distill=False,  # noqa: ANN001
              extra_hooks=()) -> dict[str, Any]:  # noqa: ANN001
        hooks: list[Any] = [LoggingHook(self.on_step)] if self.on_step else []
        hooks += list(extra_hooks)
        if distill:
            hooks.append(self._distill_hook(model))
        trainer = build_trainer(model, spec, self.train_set, cfg, out=path, hooks=hooks, device=self.device, kind=kind,
                                plan=plan, masks=masks, recipe=self.recipe)  # fmt: skip
        res = trainer.train(resume=path.is_file())
        return {"steps": res.steps, "seconds": res.seconds, "s_per_step": res.s_per_step}

    def _distill_hook(self, student: torch.nn.Module) -> Any:
        """Feature imitation of the dense model (the recipe's retrain.distill settings, if any)."""
        dcfg = self.recipe.retrain.distill if self.recipe.retrain.distill is not None else DistillSection()
        dcfg = dataclasses.replace(dcfg, type=dcfg.type if dcfg.type != "none" else "imitation", teacher=str(self.dense_path))
        recipe = dataclasses.replace(self.recipe, retrain=dataclasses.replace(self.recipe.retrain, distill=dcfg))
        return distill_hook(recipe, read_checkpoint(self.dense_path), student)


def _new_run(recipe: Recipe, out: Path, device: str, on_stage: Any, on_step: Any) -> _Run:
    default = recipe.prune.method if recipe.prune.method != "magnitude" else "l1"
    techniques = [parse_technique(t) for t in (recipe.sweep.techniques or [default])]
    rounds_of = {t.text: (max(1, recipe.prune.steps) if t.progressive else 1) for t in techniques}
    # variant names say what the number is: a fraction of channels cut, of MACs kept, of weights zeroed
    points: list[tuple[str, dict[str, Any]]] = [(f"cut{_ratio_tag(r)}", {"ratio": r}) for r in recipe.sweep.ratios]
    points += [(f"keep-macs{_ratio_tag(t)}", {"target_macs": t}) for t in recipe.sweep.target_macs]
    points += [(f"keep-lat{_ratio_tag(t)}", {"target_latency": t}) for t in recipe.sweep.target_latency]
    n_struct = sum(rounds_of[t.text] for t in techniques) * len(points)
    n_masked = len(points) * int(recipe.sweep.match_masked) + len(recipe.sweep.sparsities)
    n_sparse = sum(1 for t in techniques if t.sparse) * len(points)
    total_stages = 5 + 2 * n_struct + n_sparse + 2 * n_masked + int(recipe.sweep.int8 != "none")
    return _Run(recipe, out, device, on_stage, on_step, StepState(out / "state.json"), techniques, points, rounds_of,
                total_stages, keys=StepKeys(recipe))  # fmt: skip


def _run_sweep(
    recipe: Recipe,
    out: Path,
    *,
    device: str,
    on_stage: Callable[[str, int, int], None] | None,
    on_step: Callable[[Any], None] | None,
) -> SweepResult:
    out.mkdir(parents=True, exist_ok=True)
    run = _new_run(recipe, out, device, on_stage, on_step)
    for step in SWEEP_STEPS:
        step(run)
    assert run.result is not None
    return run.result


# ---------------------------------------------------------------------------------------------
# the steps


def step_data(run: _Run) -> None:
    run.stage("data")
    recipe = run.recipe
    run.train_set, run.val_set = load_datasets(recipe, hflip=recipe.train.hflip)
    spec = ModelSpec(recipe.model.name, {**recipe.model.kwargs})
    if "num_classes" not in spec.kwargs and accepts(get_builder(spec.name), "num_classes"):
        spec.kwargs["num_classes"] = run.train_set.num_classes  # (Ultralytics models take nc: the recipe sets it)
    run.spec = spec


def step_dense(run: _Run) -> None:
    """1. The dense baseline: trained here, or the recipe's ``model.weights`` checkpoint."""
    recipe, state, dense_path = run.recipe, run.state, run.dense_path
    run.stage("dense baseline")
    dense = run.finished("dense", run.keys.dense)
    if dense is not None:
        run.dense = dense
        return
    state.begin("dense", run.keys.dense, [dense_path])
    if recipe.model.weights and is_checkpoint(recipe.model.weights):
        model, ck = load_checkpoint(recipe.model.weights)
        run.spec = ck.spec
        save_checkpoint(dense_path, model, run.spec, kind="dense", recipe=recipe.to_dict())
        info = {"steps": 0, "seconds": 0.0, "source": str(recipe.model.weights)}
    else:
        torch.manual_seed(recipe.train.seed)  # the same initial weights on every run
        model = build_model(run.spec, weights=recipe.model.weights) if recipe.model.weights else build_model(run.spec)
        info = run.train(model, run.spec, recipe.train, dense_path, kind="dense")
        model, _ = load_checkpoint(dense_path)
    run.dense = {**info, **run.score(model)}
    state.put("dense", run.dense, [dense_path], run.keys.dense)


def step_control(run: _Run) -> None:
    """2. The dense control: the same retraining budget as every variant."""
    run.stage("dense control (same retraining as every variant)")
    control = run.finished("control", run.keys.control)
    if control is not None:
        run.control = control
        return
    run.state.begin("control", run.keys.control, [run.control_path])
    model, ck = load_checkpoint(run.dense_path)
    info = run.train(model, ck.spec, run.recipe.retrain, run.control_path, kind="dense")
    run.control = {**info, **run.score(load_checkpoint(run.control_path)[0])}
    run.state.put("control", run.control, [run.control_path], run.keys.control)


def step_variants(run: _Run) -> None:
    """3. Every technique at every point (structured), then masked pruning at the matched and the
    recipe's sparsities."""
    for tech in run.techniques:
        for tag, point in run.points:
            name, rounds = f"{tech.text}-{tag}", run.rounds_of[tech.text]
            run.variants.append(_run_variant(run, name, f"structured-{tech.text}", point,
                                             _structured_round(run, tech, point, rounds, name), rounds, tech.distill,
                                             tech))
    sparsities: list[float] = []
    if run.recipe.sweep.match_masked:
        probe = build_model(run.spec)
        first = [v for v in run.variants if v["method"] == f"structured-{run.techniques[0].text}"]
        sparsities = [matched_sparsity(probe, v["pruned"]["params"]) for v in first]
    sparsities += [s for s in run.recipe.sweep.sparsities if all(abs(s - x) > 1e-3 for x in sparsities)]
    run.variants += [_run_variant(run, f"masked-zero{_ratio_tag(s)}", "masked", {"sparsity": s},
                                  lambda k, s=s: {"method": "magnitude", "sparsity": s, "recover": 0}) for s in sparsities]


def step_bench(run: _Run) -> None:
    """4. Latency, MACs and sizes of the control and every final variant, interleaved."""
    run.stage("bench (interleaved latency, MACs, sizes)")
    paths = [run.control_path] + [v["checkpoint"] for v in run.variants]
    run.bench_rows = bench_checkpoints(paths, run.recipe.bench)
    write_csv(run.bench_rows, run.out / "bench.csv")
    first_bs = run.recipe.bench.batch_sizes[0]
    run.by_ckpt = {Path(b.checkpoint).name: b for b in run.bench_rows if b.batch_size == first_bs}


def step_deploy(run: _Run) -> None:
    """The FP32/INT8 deployment table (``sweep.int8``), when asked for."""
    sweep = run.recipe.sweep
    if sweep.int8 == "none":
        return
    run.stage("deploy: INT8 in ONNX Runtime" + (" (PTQ and QAT)" if sweep.qat_steps else " (PTQ)"))
    structured = [v for v in run.variants if v["method"].startswith("structured")]
    if sweep.int8 == "smallest" and structured:
        structured = [min(structured, key=lambda v: run.by_ckpt[v["checkpoint"].name].macs)]
    run.deploy_md = deploy_report(run.recipe, run.out, [run.control_path] + [v["checkpoint"] for v in structured],
                                  run.val_set)  # fmt: skip


def step_report(run: _Run) -> None:
    """5. ``results.csv``, ``results.md`` and the plots."""
    run.stage("report")
    recipe, out, dense, control = run.recipe, run.out, run.dense, run.control
    rows = [sweep_row("dense", "dense", None, None, run.by_ckpt[run.control_path.name], dense, control, dense, control,
                 run.control_path, recipe)]  # fmt: skip
    for v in run.variants:
        row = sweep_row(v["variant"], v["method"], v["ratio"], v["sparsity"], run.by_ckpt[v["checkpoint"].name],
                   v["pruned"], v["retrained"], dense, control, v["checkpoint"], recipe, v["target_macs"])
        rows.append({**row, **target_columns(v)})
    csv_path = out / "results.csv"
    write_rows(rows, csv_path)
    md = out / "results.md"
    with atomic_open(md, "w") as f:
        f.write(sweep_markdown(rows, recipe, dense, control) + run.deploy_md)
    plots = sweep_plots(rows, run.variants, out, run.val_set, run.control_path, recipe)
    run.result = SweepResult(out=out, rows=rows, csv=csv_path, markdown=md, bench_csv=out / "bench.csv", plots=plots,
                             seconds=time.perf_counter() - run.t_start, skipped=run.skipped)


SWEEP_STEPS: tuple[Callable[[_Run], None], ...] = (
    step_data, step_dense, step_control, step_variants, step_bench, step_deploy, step_report,
)


# ---------------------------------------------------------------------------------------------
# one variant: rounds of prune + eval, retrain + eval


def _run_variant(run: _Run, name: str, method: str, point: dict[str, Any], prune: Callable[[int], dict[str, Any]],
                 rounds: int = 1, distill: bool = False, tech: Technique | None = None) -> dict[str, Any]:
    """(``+sparse``: sparse training first, then) ``rounds`` x (prune with ``prune(round)`` + eval,
    retrain + eval), each step resumable; the retraining budget is split over the rounds and the
    sparse steps come out of it (the same total for every variant)."""
    source, seconds, budget, sparse = run.dense_path, 0.0, run.recipe.retrain.steps, None
    if tech is not None and tech.sparse:
        n = (run.recipe.prune.sparsify or SparsifySection()).steps
        if n >= budget:
            raise RecipeError(f"technique {tech.text!r}: prune.sparsify.steps ({n}) must be smaller than the "
                              f"retraining budget retrain.steps ({budget}): they are taken from it")
        source, sparse = _sparse_step(run, name, point, tech)
        budget -= n
        seconds += float(sparse.get("seconds", 0.0))
    pr: dict[str, Any] = {}
    rt: dict[str, Any] = {}
    for k in range(1, rounds + 1):
        key = name if k == rounds else f"{name}.r{k}"
        after = run.keys.sparse(name) if sparse is not None else None  # the cut follows the sparse training
        pr = _prune_step(run, key, k, source, point, prune(k), after=after)
        rt = _retrain_step(run, key, k, rounds, distill, budget=budget, after=after)
        seconds += float(rt.get("seconds", 0.0))
        source = run.out / f"{key}.pt"
    ratio = point.get("ratio")
    if ratio is None and "target_macs" in point:  # the channel ratio the search found (all rounds)
        kept = 1.0
        for p in plan_chain(read_checkpoint(run.out / f"{name}.pruned.pt").plan):
            kept *= 1.0 - p.ratio
        ratio = round(1.0 - kept, 4)
    return {"variant": name, "method": method, "ratio": ratio, "sparsity": point.get("sparsity"),
            "target_macs": point.get("target_macs"), "pruned": pr, "retrained": {**rt, "seconds": seconds},
            "checkpoint": source, "pruned_path": run.out / f"{name}.pruned.pt",
            "sparse_steps": run.recipe.retrain.steps - budget, "sparse": sparse}  # fmt: skip


def _sparse_step(run: _Run, name: str, point: dict[str, Any], tech: Technique) -> tuple[Path, dict[str, Any]]:
    """``prune.sparsify.steps`` of sparse training from the dense model, targeted at the channels
    the variant's cut removes (its ratio, or the ratio its MACs target needs)."""
    recipe = run.recipe
    scfg = recipe.prune.sparsify or SparsifySection()
    path = run.out / f"{name}.sparse.pt"
    run.stage(f"{name}: sparse training ({scfg.steps} of the {recipe.retrain.steps} steps)")
    ks = run.keys.sparse(name)
    sp = run.finished(f"{name}:sparse", ks)
    if sp is not None:
        return path, sp
    run.state.begin(f"{name}:sparse", ks, [path])
    model, ck = load_checkpoint(run.dense_path)
    pcfg = PruneSection(**{**vars(recipe.prune), "method": tech.criterion, "target_macs": None, "target_params": None})
    ratio = point.get("ratio")
    if ratio is None:
        search = dataclasses.replace(pcfg, method="l1" if needs_data(pcfg.method) else pcfg.method)
        ratio = find_ratio_for_target(model, search, target_macs=point["target_macs"],
                                      macs_input_size=recipe.bench.input_size).ratio
    hook = SparsityHook(model, scfg, prune=pcfg, ratio=ratio)
    cfg = dataclasses.replace(recipe.retrain, steps=scfg.steps, epochs=None, distill=None)
    info = run.train(model, ck.spec, cfg, path, kind="dense", extra_hooks=[hook])
    sp = {**info, **run.score(load_checkpoint(path)[0]), "ratio": ratio,
          "penalty_start": hook.start_penalty, "penalty_end": hook.penalty}
    run.state.put(f"{name}:sparse", sp, [path], ks)
    return path, sp


def _prune_step(run: _Run, key: str, k: int, source: Path, point: dict[str, Any], args: dict[str, Any],
                after: str | None = None) -> dict[str, Any]:
    """Prune + eval (mAP right after the cut; with ``prune.recover`` also after recovery). ``after``:
    the key of a step this one follows (sparse training): redone when that one is."""
    pruned_path = run.out / f"{key}.pruned.pt"
    run.stage(f"{key}: prune + eval")
    kp = run.keys.prune(key) if after is None else settings_hash([run.keys.prune(key), after])
    pr = run.finished(f"{key}:prune", kp)
    if pr is not None:
        return pr
    run.state.begin(f"{key}:prune", kp, [pruned_path])
    model, ck = load_checkpoint(source)
    rec = dataclasses.replace(run.recipe, prune=PruneSection(**{**vars(run.recipe.prune), **args}))
    recovering = rec.prune.method != "magnitude" and rec.prune.recover > 0
    done = prune_loaded(model, ck.spec, ck if k > 1 else None, rec, pruned_path, source=str(source),
                        macs_input_size=run.recipe.bench.input_size if "ratio" not in point else None,
                        on_cut=run.score if recovering else None)  # fmt: skip
    if done.masked is not None:
        counts = {"params": done.masked.total_params, "params_nonzero": done.masked.nonzeros_after}
    else:
        counts = {"params": done.structured.report.params_after}
    if done.cut_metrics is not None:  # mAP right after the cut, then after recovery (the checkpoint)
        recovered = run.score(model)
        pr = {**counts, **done.cut_metrics, "mAP_recovered": recovered["mAP"], "mAP50_recovered": recovered["mAP50"]}
    else:
        pr = {**counts, **run.score(model)}
    run.state.put(f"{key}:prune", pr, [pruned_path], kp)
    return pr


def _retrain_step(run: _Run, key: str, k: int, rounds: int, distill: bool, *, budget: int,
                  after: str | None = None) -> dict[str, Any]:
    pruned_path, retrained_path = run.out / f"{key}.pruned.pt", run.out / f"{key}.pt"
    run.stage(f"{key}: retrain + eval")
    kr = run.keys.retrain(key) if after is None else settings_hash([run.keys.retrain(key), after])
    rt = run.finished(f"{key}:retrain", kr)
    if rt is not None:
        return rt
    steps = budget // rounds + (budget % rounds if k == rounds else 0)
    run.state.begin(f"{key}:retrain", kr, [retrained_path])
    model, ck = load_checkpoint(pruned_path)  # masks of masked variants are kept while training
    cfg = dataclasses.replace(run.recipe.retrain, steps=steps, epochs=None)
    info = run.train(model, ck.spec, cfg, retrained_path, kind=ck.kind, plan=ck.plan, masks=ck.masks, distill=distill)
    rt = {**info, **run.score(load_checkpoint(retrained_path)[0])}
    run.state.put(f"{key}:retrain", rt, [retrained_path], kr)
    return rt


def _structured_round(run: _Run, tech: Technique, point: dict[str, Any], rounds: int, name: str) -> Callable:
    def prune(k: int) -> dict[str, Any]:
        args: dict[str, Any] = {"method": tech.criterion, "target_macs": None, "target_params": None,
                                "target_latency": None}
        if "target_macs" not in point and run.recipe.prune.allocation == "sensitivity":
            args.update(allocation="uniform", sensitivity=None)  # the table spreads MACs budgets only
        if "target_latency" in point:  # each round keeps target^(1/rounds) of the latency left
            args["target_latency"] = point["target_latency"] ** (1.0 / rounds)
        elif "ratio" in point:  # each round keeps (1 - r)^(1/rounds) of the channels left
            args["ratio"] = 1.0 - (1.0 - point["ratio"]) ** (1.0 / rounds)
        else:  # round k reaches target^(k/rounds) of the dense MACs
            kept = kept_macs(run.out / f"{name}.r{k - 1}.pruned.pt") if k > 1 else 1.0
            args["target_macs"] = min(0.999, point["target_macs"] ** (k / rounds) / kept)
        return args

    return prune



__all__ = ["SWEEP_COLUMNS", "SWEEP_STEPS", "TARGET_TOL", "SweepResult", "SweepRow", "run_sweep"]
