"""Compress to a goal: search for the cut that meets an accuracy floor and/or a cost budget.

The search runs on Optuna (``pip install 'surgery[search]'``; why Optuna: docs/howto/compress.md).
A study is two objectives, proxy mAP (maximised) and cost (minimised: the kept fraction of the
dense MACs or of its measured network latency), with the goal's floor and budget as Optuna
constraints, so its Pareto front is the report's and the chosen trial is the best feasible one.

Each trial is one pipeline job (:meth:`Allocator.job`, run by :func:`cut_and_recover` through
:func:`surgery.pruning.prune.run_job`, what ``surgery prune`` runs): a copy of the dense model is
ranked, allocated to the trial's budget, cut and recovered without retraining; its mAP is scored
on a *held-out calibration split* (training images the recovery did not see; the validation
split stays for the final check) and its cost measured. The parameters Optuna samples:

- ``keep``: the fraction of the dense MACs the cut aims at (the global ratio, re-expressed so that
  every trial of a MACs budget lands on the budget): the trial's budget is a
  :class:`surgery.pruning.budget.KeepMacs` with per-group weights, so the pipeline's MACs-target
  search (:func:`surgery.pruning.target.allocate_for_target`) scales the cut and verifies the MACs on
  a cut copy (:mod:`surgery.pruning.candidate`) exactly as for ``surgery prune --keep-macs``;
- ``mult:<stage>``: a multiplier of the ratio per stage (groups whose roots share a name prefix);
- ``sens_power`` (with a sensitivity table from ``surgery sensitivity``): per-group multipliers
  ``(mean loss / group loss) ** p`` from the table's mAP loss at its middle ratio;
- ``criterion`` (l1, l2, bn, ... ) and ``round_to``.

The first trial is the uniform allocation (every multiplier 1, the recipe's criterion and
rounding): the search starts from what ``surgery prune --keep-macs`` gives.

The study lives in the run folder (SQLite through Optuna's RDB storage, with heartbeats so a
trial whose worker died is marked failed) or at ``storage`` (any SQLAlchemy URL, e.g.
``postgresql://``): workers on several machines join the same study, each stops when the study
holds ``trials`` finished trials, and a killed search resumes without repeating a finished trial.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import multiprocessing
import os
import re
import statistics
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from .config.recipe import DistillSection, PruneSection, Recipe
from .data import dataset_for
from .deployment.export import export_onnx
from .deployment.quantize import quantize_checkpoint
from .errors import RecipeError, SurgeryError, require_extra
from .measure.evaluate import evaluate
from .pruning.budget import Budget, CutRatio, KeepMacs, PruneJob, Recovery, Rounding
from .pruning.calibrate import calibration_data
from .pruning.graph import trace
from .pruning.latency import network_ms
from .pruning.prune import PruneResult, run_job
from .pruning.recover import RECOVER_BATCH_SIZE
from .pruning.sensitivity import DENSE, LABEL_FREE, read_table
from .storage.atomic import atomic_open, atomic_path
from .storage.checkpoint import load_checkpoint, save_pruned
from .training.callbacks import Callbacks
from .workflows import holdout_split, label_free_sensitivity, retrain_checkpoint
from .yolo.ultralytics_adapter import UltralyticsDetector
from .yolo.ultralytics_handback import save_for_ultralytics

STUDY_FILE = "study.db"
MAX_GROUP_RATIO = 0.9  # never cut more of one group in a trial
MAX_STAGES = 8
# a MACs budget is met within 1% (relative): the cost model's bisection lands within a channel or
# two of the budget, and round_to makes the real count a step function (surgery.pruning.target uses 2%)
BUDGET_TOL = 0.01
DEFAULT_CRITERIA = ("l1", "l2", "bn")
# widths a multiple of 8 only: on the quickstart FCOS the best trial at half the MACs with round_to 1
# (26 of 35 cut widths not a multiple of 8) ran end to end in ONNX Runtime at 0.79 of the dense time,
# the uniform round_to 8 cut at 0.64 for about the same MACs (docs/benchmarks/compress.md): a MACs
# budget stands for speed, and odd widths waste the kernels' vector lanes
DEFAULT_ROUND_TO = (8,)


class CompressError(SurgeryError):
    """A compression goal or search that cannot be run as asked."""


# --------------------------------------------------------------------------------------------
# the goal


@dataclass
class Goal:
    """What the user asks for: an accuracy floor (``keep_map``: fraction of the dense proxy mAP,
    or ``min_map``: absolute) and/or a cost budget (``keep_macs`` or ``keep_latency``: fraction
    of the dense cost kept, on ``runtime``)."""

    keep_map: float | None = None
    min_map: float | None = None
    keep_macs: float | None = None
    keep_latency: float | None = None
    runtime: str = "onnxruntime"
    int8: bool = False

    def validate(self) -> None:
        for name in ("keep_map", "keep_macs", "keep_latency"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise RecipeError(f"--{name.replace('_', '-')} is a fraction in (0, 1], got {v}")
        if self.min_map is not None and not 0.0 <= self.min_map <= 1.0:
            raise RecipeError(f"--min-map is an mAP in [0, 1], got {self.min_map}")
        if self.keep_map is not None and self.min_map is not None:
            raise RecipeError("give --keep-map or --min-map, not both")
        if self.keep_macs is not None and self.keep_latency is not None:
            raise RecipeError("give --keep-macs or --keep-latency, not both")
        if self.floor_given is False and self.budget is None:
            raise RecipeError("no goal: give an accuracy floor (--keep-map / --min-map) and/or a budget "
                              "(--keep-macs / --keep-latency)")
        if self.runtime not in ("onnxruntime", "torch"):
            raise RecipeError(f"--runtime: onnxruntime or torch, got {self.runtime!r}")

    @property
    def floor_given(self) -> bool:
        return self.keep_map is not None or self.min_map is not None

    @property
    def cost_kind(self) -> str:
        return "latency" if self.keep_latency is not None else "macs"

    @property
    def budget(self) -> float | None:
        return self.keep_latency if self.keep_latency is not None else self.keep_macs

    @property
    def directions(self) -> tuple[str, ...]:
        """The study's objectives: proxy mAP up, and cost down unless a MACs budget fixes it. With
        ``--keep-macs`` every trial keeps the budget's MACs (``keep`` is the budget), so the cost
        differs only by rounding (48.9-50.1% for 0.5); as a second objective that noise put
        low-mAP trials on the sampler's front and spread its search over them."""
        return ("maximize",) if self.keep_macs is not None else ("maximize", "minimize")

    def floor(self, dense_map: float) -> float | None:
        if self.min_map is not None:
            return self.min_map
        return None if self.keep_map is None else self.keep_map * dense_map

    def describe(self) -> str:
        parts = []
        if self.keep_map is not None:
            parts.append(f"mAP >= {self.keep_map:.1%} of dense")
        if self.min_map is not None:
            parts.append(f"mAP >= {self.min_map:.3f}")
        if self.budget is not None:
            where = f" on {self.runtime}" if self.cost_kind == "latency" else ""
            parts.append(f"{self.cost_kind} <= {self.budget:.1%} of dense{where}")
        aim = "most accurate within the budget" if self.budget is not None else "fastest above the floor"
        return f"{', '.join(parts)} ({aim})"


# --------------------------------------------------------------------------------------------
# the search space


@dataclass
class SearchSpace:
    keep: tuple[float, float] = (0.15, 0.95)  # fraction of dense MACs the scale aims at (no MACs budget)
    multiplier: tuple[float, float] = (0.5, 1.5)
    max_stages: int = MAX_STAGES  # stages get one multiplier each: more stages, a finer allocation
    criteria: tuple[str, ...] = DEFAULT_CRITERIA
    round_to: tuple[int, ...] = DEFAULT_ROUND_TO
    sensitivity: str | None = None  # a `surgery sensitivity` CSV: adds the sens_power parameter

    def validate(self) -> None:
        lo, hi = self.multiplier
        if not 0.0 < lo <= hi:
            raise RecipeError(f"--multiplier: LO,HI with 0 < LO <= HI, got {lo},{hi}")
        if self.max_stages < 1:
            raise RecipeError(f"--max-stages must be >= 1, got {self.max_stages}")
        if not self.criteria or not self.round_to:
            raise RecipeError("--criteria and --round-to each need at least one value")


def stage_of(root: str, depth: int = 3) -> str:
    """A group's stage: the first ``depth`` parts of its root's name (``backbone.body.layer2.0.conv1``
    -> ``backbone.body.layer2``; an Ultralytics YOLO's ``net.model.4.m.0.cv1.conv`` -> ``net.model.4``)."""
    return ".".join(root.split(".")[:depth]) or root


def _natural(name: str) -> list[Any]:
    """Sort key: numeric parts as numbers (``net.model.4`` before ``net.model.12``)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def stages_of(roots: Sequence[str], max_stages: int = MAX_STAGES) -> dict[str, str]:
    """root -> stage: the deepest name depth (3, 2, 1) that gives at most ``max_stages`` stages and
    more than one; else the depth-3 stages in name order (numbers as numbers: a YOLO's module
    indices, in forward order) merged into ``max_stages`` contiguous runs (``net.model.0..net.model.4``).

    Numeric parts are kept: they are a YOLO's stages (``net.model.4``). Dropping them (as this did)
    put every YOLO group into five stages by layer type (``net.model.cv1`` held C2f inputs of the
    backbone, the neck and the SPPF alike): a multiplier moved one layer type everywhere."""
    for depth in (3, 2, 1):
        mapping = {r: stage_of(r, depth) for r in roots}
        if 1 < len(set(mapping.values())) <= max_stages:
            return mapping
    fine = {r: stage_of(r, 3) for r in roots}
    names = sorted(set(fine.values()), key=_natural)
    k = max(1, min(max_stages, len(names)))
    cuts = [round(i * len(names) / k) for i in range(k + 1)]  # k runs as even as the names allow
    runs = [names[a:b] for a, b in zip(cuts, cuts[1:])]
    label = {n: (run[0] if len(run) == 1 else f"{run[0]}..{run[-1]}") for run in runs for n in run}
    return {r: label[fine[r]] for r in roots}


def sensitivity_weights(path: str | Path, roots: Sequence[str]) -> dict[str, float]:
    """Per-group ``mean loss / group loss`` from a sensitivity table's mAP loss at its middle
    ratio (an insensitive group gets a weight > 1: it is cut more when ``sens_power`` > 0)."""
    _, rows = read_table(path)
    dense = next((r for r in rows if r.group == DENSE), None)
    if dense is None:
        raise RecipeError(f"{path}: the sensitivity table has no 'dense' row")
    ratios = sorted({r.ratio for r in rows if r.group != DENSE})
    if not ratios:
        raise RecipeError(f"{path}: the sensitivity table has no group rows")
    mid = ratios[len(ratios) // 2]
    loss = {r.group: max(1e-4, dense.map - r.map) for r in rows if r.group in roots and abs(r.ratio - mid) < 1e-9}
    if not loss:
        raise RecipeError(f"{path}: no row names a group of this model (measured on another model?)")
    mean = statistics.fmean(loss.values())
    return {r: mean / loss.get(r, mean) for r in roots}


def resolve_sensitivity(space: SearchSpace, dense: nn.Module, recipe: Recipe, run_dir: str | Path,
                        macs_input_size: int) -> SearchSpace:
    """``space`` with ``sensitivity: label-free`` replaced by the table it names: measured on the dense
    model as ``surgery prune --sensitivity label-free`` measures it (held-out training images,
    no annotation read), kept in ``run_dir`` so a resumed search and other workers reuse it."""
    if space.sensitivity != LABEL_FREE:
        return space
    table = label_free_sensitivity(dense, recipe, Path(run_dir), macs_input_size)
    return dataclasses.replace(space, sensitivity=str(table))


@dataclass
class TrialConfig:
    """One point of the search space, decoded."""

    keep: float
    multipliers: dict[str, float]
    criterion: str
    round_to: int
    sens_power: float = 0.0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrialConfig:
        mults = {k.split(":", 1)[1]: float(v) for k, v in params.items() if k.startswith("mult:")}
        return cls(keep=float(params["keep"]), multipliers=mults, criterion=str(params["criterion"]),
                   round_to=int(params["round_to"]), sens_power=float(params.get("sens_power", 0.0)))


class Allocator:
    """The search space on one model: its prunable groups, their stages and sensitivity weights,
    and the pipeline job (:class:`surgery.pruning.budget.PruneJob`) of a :class:`TrialConfig`.

    A trial's budget is a :class:`~surgery.pruning.budget.KeepMacs` with per-group weights (stage
    multiplier x sensitivity weight ** power): the pipeline's MACs-target search
    (:func:`surgery.pruning.target.allocate_for_target`) finds the scale of the cut that keeps
    ``keep`` of the dense MACs and verifies it on a cut copy (:mod:`surgery.pruning.candidate`), as
    ``surgery prune --keep-macs`` does. Nothing here counts MACs or cuts a model."""

    def __init__(self, dense: nn.Module, base: PruneSection, macs_input_size: int, trace_size: int,
                 space: SearchSpace) -> None:
        self.base, self.macs_input_size = base, macs_input_size
        graph = trace(copy.deepcopy(dense), trace_size=trace_size, skip=base.skip)
        self.roots = [g.root for g in graph.groups if g.prunable]
        self.stages = stages_of(self.roots, space.max_stages)
        self.weights = sensitivity_weights(space.sensitivity, self.roots) if space.sensitivity else {}

    def shape(self, cfg: TrialConfig) -> dict[str, float]:
        """Relative per-group cut weights (the pipeline scales them to the budget)."""
        return {r: cfg.multipliers.get(self.stages[r], 1.0) * self.weights.get(r, 1.0) ** cfg.sens_power
                for r in self.roots}

    def budget(self, cfg: TrialConfig) -> KeepMacs:
        return KeepMacs(cfg.keep, self.macs_input_size, group_weights=self.shape(cfg), tol=BUDGET_TOL, at_most=True)

    def job(self, cfg: TrialConfig, recover_batches: int, budget: Budget | None = None) -> PruneJob:
        """The trial as a pipeline job: ``budget`` (default :meth:`budget`), the trial's criterion
        and rounding, the recipe's skip, anchors and min_channels, the re-fit on ``recover_batches``."""
        b = self.base
        return PruneJob(budget=budget or self.budget(cfg), method=cfg.criterion,
                        rounding=Rounding(cfg.round_to, b.min_channels, strict=b.strict_round_to), skip=tuple(b.skip),
                        anchors=b.anchors, calib_batches=b.calib_batches,
                        recovery=Recovery(recover_batches) if recover_batches > 0 else None)


def group_ratios(result: PruneResult) -> dict[str, float]:
    """Root -> the fraction of its channels a pipeline result cut (the groups it cut)."""
    assert result.allocation is not None and result.graph is not None
    roots = {g.index: g.root for g in result.graph.groups}
    return {roots[i]: float(r) for i, r in result.allocation.group_ratios.items() if r > 0}


def cut_and_recover(
    dense: nn.Module, job: PruneJob, *, macs_input_size: int, trace_size: int,
    calib_data: Iterable[Any] | None, recover_data: Iterable[Any] | None,
) -> tuple[nn.Module, PruneResult]:
    """A copy of ``dense`` cut and recovered (no retraining) by the pipeline
    (:func:`surgery.pruning.prune.run_job`: rank, allocate, cut, recover; MACs counted before and
    after at ``macs_input_size``): the one call into pruning the search makes."""
    model = copy.deepcopy(dense)
    result = run_job(model, job, data=calib_data, recover_data=recover_data, trace_size=trace_size,
                     macs_size=macs_input_size)
    return model.eval(), result


# --------------------------------------------------------------------------------------------
# trials and results


@dataclass
class TrialRecord:
    number: int
    state: str  # COMPLETE | RUNNING | FAIL | ...
    params: dict[str, Any]
    proxy_map: float | None = None
    macs_ratio: float | None = None
    latency_ratio: float | None = None
    params_ratio: float | None = None
    seconds: float | None = None
    feasible: bool | None = None
    worker: str = ""
    ratios: dict[str, float] = field(default_factory=dict)  # group root -> fraction cut (groups not named: 0)
    retrained_map: float | None = None  # filled in for the trial that was retrained

    def cost(self, kind: str) -> float | None:
        return self.latency_ratio if kind == "latency" else self.macs_ratio


@dataclass
class SearchSettings:
    trials: int = 30
    seconds: float | None = None  # --time
    recover_batches: int = 16
    holdout: int = 64  # held-out calibration images
    macs_input_size: int = 320
    trace_size: int = 256
    seed: int = 0
    study_name: str = "compress"
    latency_runs: int = 10
    latency_rounds: int = 3
    workers: int = 1  # processes on this machine sharing the study (the torch threads are split between them)


@dataclass
class SearchResult:
    goal: Goal
    study_name: str
    storage: str
    dense_map: float
    trials: list[TrialRecord]
    ran: list[int]  # trial numbers this worker ran
    chosen: TrialRecord | None
    met: bool
    seconds: float
    stages: dict[str, str] = field(default_factory=dict)
    miss: str = ""  # why the goal was not met, by how much, what to try

    @property
    def complete(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state == "COMPLETE"]

    def pareto(self) -> list[TrialRecord]:
        """Trials no other complete trial beats on both proxy mAP and cost."""
        kind = self.goal.cost_kind
        done = [t for t in self.complete if t.proxy_map is not None and t.cost(kind) is not None]
        return [t for t in done if not any(
            o.proxy_map >= t.proxy_map and o.cost(kind) <= t.cost(kind)
            and (o.proxy_map > t.proxy_map or o.cost(kind) < t.cost(kind)) for o in done)]


def _optuna() -> Any:
    require_extra(("optuna", "sqlalchemy"), "search", "surgery compress")
    import optuna  # an optional extra: imported only when a search runs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(run_dir: str | Path, storage: str | None) -> str:
    """The study's storage: ``storage`` (a SQLAlchemy URL) or SQLite in the run folder."""
    if storage:
        return storage
    return f"sqlite:///{Path(run_dir).resolve() / STUDY_FILE}"


def open_study(url: str, name: str, seed: int, heartbeat: int = 30,
               directions: Sequence[str] = ("maximize", "minimize")) -> Any:
    """Create or load the study (objectives :attr:`Goal.directions`; the constraints come
    from each trial's ``constraints`` attribute). Heartbeats: a trial whose worker died is failed
    by the next worker after ``2 x heartbeat`` seconds (it was not finished, so it is not repeated)."""
    optuna = _optuna()
    if url.startswith("postgresql") and "+" not in url.split(":", 1)[0]:  # SQLAlchemy's default driver: psycopg 3
        require_extra(("psycopg",), "search", "a PostgreSQL study storage")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(3):  # workers starting together race to create the tables
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                                 grace_period=2 * heartbeat)
            break
        except Exception as e:  # noqa: BLE001 - sqlalchemy errors of a concurrent schema creation
            if attempt == 2:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise CompressError(f"cannot open the study storage {_redact(url)}: {first}") from e
            time.sleep(1.0 + attempt)
    sampler = optuna.samplers.TPESampler(seed=seed + os.getpid() % 1000, n_startup_trials=6, multivariate=True,
                                         constraints_func=_constraints, warn_independent_sampling=False)
    for attempt in range(3):  # workers starting together race to create the tables and the study
        try:
            return optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                       directions=list(directions))
        except Exception:  # noqa: BLE001 - sqlalchemy's IntegrityError / OperationalError: retry once created
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _constraints(trial: Any) -> Sequence[float]:
    return trial.user_attrs.get("constraints", [0.0])


# A latency budget B: the MACs a trial aims at are searched in [LO x B, HI x B]. A cut network's
# latency falls no faster than its MACs (what does not shrink with the widths: layout reorders,
# per-operator dispatch, the input layer), and on every detector measured here not less than half as
# fast (the quickstart FCOS in ONNX Runtime: 0.53-0.62 of the dense network at half the MACs, 0.28-0.33
# at a quarter; docs/benchmarks/runtimes.md); HI leaves room for widths that run faster per MAC.
# The whole (0.15, 0.95) range spent most trials far from the budget (0.30 or 0.93 of the latency for
# a budget of 0.58: docs/benchmarks/compress.md, fourth run).
LATENCY_KEEP = (0.5, 1.1)


def keep_range(goal: Goal, space: SearchSpace) -> tuple[float, float]:
    """The fraction of the dense MACs a trial's cut aims at: the budget itself for a MACs budget,
    around a latency budget (:data:`LATENCY_KEEP`), else the space's whole range."""
    if goal.keep_macs is not None:
        return goal.keep_macs, goal.keep_macs
    lo, hi = space.keep
    if goal.keep_latency is not None:
        return max(lo, LATENCY_KEEP[0] * goal.keep_latency), min(hi, LATENCY_KEEP[1] * goal.keep_latency)
    return lo, hi


def suggest(trial: Any, goal: Goal, space: SearchSpace, stages: Sequence[str]) -> TrialConfig:
    """Sample a :class:`TrialConfig` (``keep`` from :func:`keep_range`)."""
    keep = trial.suggest_float("keep", *keep_range(goal, space))
    params: dict[str, Any] = {"keep": keep}
    for s in stages:
        params[f"mult:{s}"] = trial.suggest_float(f"mult:{s}", *space.multiplier)
    params["criterion"] = trial.suggest_categorical("criterion", list(space.criteria))
    params["round_to"] = trial.suggest_categorical("round_to", list(space.round_to))
    if space.sensitivity:
        params["sens_power"] = trial.suggest_float("sens_power", 0.0, 1.0)
    return TrialConfig.from_params(params)


def uniform_params(goal: Goal, space: SearchSpace, stages: Sequence[str], base: PruneSection) -> dict[str, Any]:
    """The uniform allocation as a trial: every multiplier 1, the recipe's criterion and rounding,
    the MACs of a MACs budget, the middle of a latency budget's MACs range (:func:`keep_range`), else
    half."""
    lo, hi = keep_range(goal, space)
    params: dict[str, Any] = {"keep": (lo + hi) / 2 if goal.keep_latency is not None else min(hi, max(lo, 0.5))}
    params.update({f"mult:{s}": 1.0 for s in stages})
    params["criterion"] = base.method if base.method in space.criteria else space.criteria[0]
    params["round_to"] = base.round_to if base.round_to in space.round_to else space.round_to[0]
    if space.sensitivity:
        params["sens_power"] = 0.0
    return params


def _record(t: Any) -> TrialRecord:
    a = t.user_attrs
    return TrialRecord(number=t.number, state=t.state.name, params=dict(t.params), proxy_map=a.get("proxy_map"),
                       macs_ratio=a.get("macs_ratio"), latency_ratio=a.get("latency_ratio"),
                       params_ratio=a.get("params_ratio"), seconds=a.get("seconds"), feasible=a.get("feasible"),
                       worker=a.get("worker", ""), ratios=dict(a.get("ratios") or {}))


def choose(trials: Sequence[TrialRecord], goal: Goal, dense_map: float) -> tuple[TrialRecord | None, bool, str]:
    """(chosen trial, goal met, why not): the most accurate trial within the budget, or the
    cheapest above the floor; none feasible: the closest (least relative violation)."""
    kind, floor, budget = goal.cost_kind, goal.floor(dense_map), goal.budget
    done = [t for t in trials if t.state == "COMPLETE" and t.proxy_map is not None and t.cost(kind) is not None]
    if not done:
        return None, False, "no trial finished"
    ok = [t for t in done if _violation(t, kind, floor, budget) == 0.0]
    if ok:
        key = (lambda t: (-t.proxy_map, t.cost(kind))) if budget is not None else (lambda t: (t.cost(kind), -t.proxy_map))
        return min(ok, key=key), True, ""
    best = min(done, key=lambda t: _violation(t, kind, floor, budget))
    return best, False, miss_line(best, goal, dense_map)


def _violation(t: TrialRecord, kind: str, floor: float | None, budget: float | None) -> float:
    v = 0.0
    if budget is not None:
        v += max(0.0, t.cost(kind) - budget * (1 + BUDGET_TOL)) / budget
    if floor is not None and floor > 0:
        v += max(0.0, floor - t.proxy_map) / floor
    return v


def miss_line(t: TrialRecord, goal: Goal, dense_map: float) -> str:
    """By how much the closest trial misses the goal, and what to try."""
    kind, floor, budget = goal.cost_kind, goal.floor(dense_map), goal.budget
    parts, tries = [], []
    if budget is not None and t.cost(kind) > budget * (1 + BUDGET_TOL):
        parts.append(f"{kind} {t.cost(kind):.1%} of dense > budget {budget:.1%}")
        tries.append(f"a looser budget (--keep-{kind} {min(1.0, t.cost(kind) * 1.05):.2f})")
    if floor is not None and t.proxy_map < floor:
        parts.append(f"proxy mAP {t.proxy_map:.3f} < floor {floor:.3f} ({floor - t.proxy_map:.3f} short)")
        tries.append("a lower floor, more --trials, or retraining longer than the search's recovery")
    return f"closest trial #{t.number}: {'; '.join(parts)}; try {' or '.join(tries)}"


# --------------------------------------------------------------------------------------------
# the search


@dataclass
class _Context:
    dense: nn.Module
    recipe: Recipe
    goal: Goal
    space: SearchSpace
    settings: SearchSettings
    allocator: Allocator
    holdout: Subset
    dense_map: float
    recover_data: Iterable[Any]
    calib_data: Iterable[Any] | None


def _score(model: nn.Module, holdout: Subset) -> float:
    return float(evaluate(model, holdout, iou_types=("bbox",)).metrics["mAP"])


def latency_ratio(dense: nn.Module, model: nn.Module, runtime: str, input_size: int, *, runs: int, rounds: int) -> float:
    """The model's network latency over the dense model's on ``runtime``: the median of the
    per-pass ratios (:func:`surgery.pruning.latency.network_ms`, interleaved so load changes cancel)."""
    d, m = network_ms([dense, model], runtime, input_size, runs=runs, rounds=rounds)
    return statistics.median(b / a for a, b in zip(d, m))


def run_trial(ctx: _Context, cfg: TrialConfig) -> dict[str, Any]:
    """Cut, recover, score and measure one trial: its user attributes."""
    t0 = time.perf_counter()
    model, result = cut_and_recover(
        ctx.dense, ctx.allocator.job(cfg, ctx.settings.recover_batches), macs_input_size=ctx.settings.macs_input_size,
        trace_size=ctx.settings.trace_size, calib_data=ctx.calib_data, recover_data=ctx.recover_data)
    attrs: dict[str, Any] = {"proxy_map": _score(model, ctx.holdout), "macs_ratio": result.report.macs_ratio,
                             "params_ratio": result.report.params_ratio, "ratios": group_ratios(result)}
    if ctx.goal.cost_kind == "latency":
        attrs["latency_ratio"] = latency_ratio(ctx.dense, model, ctx.goal.runtime, ctx.settings.macs_input_size,
                                               runs=ctx.settings.latency_runs, rounds=ctx.settings.latency_rounds)
    cost = attrs["latency_ratio"] if ctx.goal.cost_kind == "latency" else attrs["macs_ratio"]
    floor, budget = ctx.goal.floor(ctx.dense_map), ctx.goal.budget
    constraints = [cost - budget * (1 + BUDGET_TOL) if budget is not None else 0.0,
                   floor - attrs["proxy_map"] if floor is not None else 0.0]
    attrs.update(cost=cost, constraints=constraints, feasible=all(c <= 1e-9 for c in constraints),
                 seconds=round(time.perf_counter() - t0, 2), worker=f"{os.uname().nodename}:{os.getpid()}")
    return attrs


def search(
    dense: nn.Module,
    recipe: Recipe,
    goal: Goal,
    run_dir: str | Path,
    *,
    space: SearchSpace | None = None,
    settings: SearchSettings | None = None,
    storage: str | None = None,
    callbacks: Callbacks | None = None,
) -> SearchResult:
    """Run (or join, or resume) the study until it holds ``settings.trials`` finished trials or
    ``settings.seconds`` have passed; return every trial and the one the goal chooses."""
    optuna = _optuna()
    goal.validate()
    space, settings, cb = space or SearchSpace(), settings or SearchSettings(), callbacks or Callbacks()
    space.validate()
    t0 = time.perf_counter()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    url = storage_url(run_dir, storage)
    dense.eval()
    cb.stage("preparing the search (dense score, trace)")
    holdout = holdout_split(recipe, settings.holdout, settings.recover_batches)
    recover_data = calibration_data(recipe.data, batches=settings.recover_batches, batch_size=RECOVER_BATCH_SIZE,
                                    model=dense)
    needs = any(c in ("taylor", "fisher") for c in space.criteria)
    calib = calibration_data(recipe.data, batches=recipe.prune.calib_batches, model=dense) if needs else None
    allocator = Allocator(dense, recipe.prune, settings.macs_input_size, settings.trace_size, space)
    stages = sorted(set(allocator.stages.values()))
    study = open_study(url, settings.study_name, settings.seed, directions=goal.directions)
    if len(study.directions) != len(goal.directions):
        raise CompressError(f"the study {settings.study_name!r} at {_redact(url)} has {len(study.directions)} objectives, "
                            f"this goal {len(goal.directions)} (an older surgery made it); use another --out or --study")
    dense_map = study.user_attrs.get("dense_proxy_map")
    if dense_map is None:
        dense_map = _score(dense, holdout)
        study.set_user_attr("dense_proxy_map", dense_map)
        study.set_user_attr("goal", dataclasses.asdict(goal))
    elif study.user_attrs.get("goal") != dataclasses.asdict(goal):
        raise CompressError(f"the study {settings.study_name!r} at {_redact(url)} was run for another goal "
                            f"({study.user_attrs.get('goal')}); use another --out, --study or --storage")
    uniform = uniform_params(goal, space, stages, recipe.prune)
    study.enqueue_trial(uniform, skip_if_exists=True)
    ctx = _Context(dense, recipe, goal, space, settings, allocator, holdout, float(dense_map), recover_data, calib)
    threads_before = torch.get_num_threads()
    helpers, threads = _start_workers(dense, recipe, goal, run_dir, space, settings, url)
    ran: list[int] = []

    def objective(trial: Any) -> tuple[float, float] | float:
        cfg = suggest(trial, goal, space, stages)
        if _duplicate_of_earlier(study, trial, uniform):
            raise optuna.TrialPruned("the uniform trial, enqueued twice by workers starting together")
        attrs = run_trial(ctx, cfg)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        ran.append(trial.number)
        return (attrs["proxy_map"], attrs["cost"]) if len(goal.directions) == 2 else attrs["proxy_map"]

    def progress(study: Any, trial: Any) -> None:
        records = [_record(t) for t in study.get_trials(deepcopy=False)]
        done = sum(r.state == "COMPLETE" for r in records)
        best, met, _ = choose(records, goal, float(dense_map))
        line = f"trial {trial.number} ({done}/{settings.trials} done): " + _trial_text(_record(trial), goal.cost_kind)
        if best is not None:
            line += f" | best so far #{best.number}: {_trial_text(best, goal.cost_kind)}{'' if met else ' (goal not met)'}"
        cb.note(line)

    done_already = _count_complete(study)
    if done_already:
        cb.note(f"resuming study {settings.study_name!r}: {done_already} finished trials kept")
    cb.stage("searching" + (f" ({settings.workers} workers, {threads} torch threads each)" if helpers else ""))
    try:
        if done_already < settings.trials:
            stop = optuna.study.MaxTrialsCallback(settings.trials, states=(optuna.trial.TrialState.COMPLETE,))
            study.optimize(objective, n_trials=settings.trials - done_already, timeout=settings.seconds,
                           callbacks=[stop, progress], gc_after_trial=True)
        for p in helpers:  # they stop on the same count of finished trials (or time) as this one
            p.join()
    finally:
        _stop_workers(helpers)
        torch.set_num_threads(threads_before)
    records = [_record(t) for t in study.get_trials(deepcopy=False)]
    chosen, met, miss = choose(records, goal, float(dense_map))
    return SearchResult(goal=goal, study_name=settings.study_name, storage=_redact(url), dense_map=float(dense_map),
                        trials=records, ran=ran, chosen=chosen, met=met, seconds=time.perf_counter() - t0,
                        stages=allocator.stages, miss=miss)


def _start_workers(dense: nn.Module, recipe: Recipe, goal: Goal, run_dir: str | Path, space: SearchSpace,
                   settings: SearchSettings, url: str) -> tuple[list[Any], int]:
    """``settings.workers - 1`` more processes on this machine searching the same study (this one is
    the first), the torch threads split between them: small detectors at batch 8 use a second thread
    poorly, a second process fully. Returns the processes and each one's thread count."""
    if settings.workers <= 1:
        return [], torch.get_num_threads()
    threads = max(1, torch.get_num_threads() // settings.workers)
    one = dataclasses.replace(settings, workers=1)
    spawn = multiprocessing.get_context("spawn")  # never fork a process that holds torch's thread pools
    procs = [spawn.Process(target=_search_worker, args=(dense, recipe, goal, str(run_dir), space, one, url, threads,
                                                        os.getpid()), daemon=True, name=f"compress-worker-{i + 1}")
             for i in range(settings.workers - 1)]
    for p in procs:
        p.start()
    torch.set_num_threads(threads)
    return procs, threads


def _stop_workers(procs: Sequence[Any]) -> None:
    """End the helper processes still running (this worker failed or was interrupted): their
    unfinished trials are failed by the heartbeat, never counted as finished."""
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join(timeout=30)


def _search_worker(dense: nn.Module, recipe: Recipe, goal: Goal, run_dir: str, space: SearchSpace,
                   settings: SearchSettings, url: str, threads: int, parent: int) -> None:
    """A helper process: the same search on the same study, no output; it ends with its parent."""
    torch.set_num_threads(threads)

    def watch() -> None:  # a parent killed with SIGKILL cannot terminate it: leave when orphaned
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    search(dense, recipe, goal, run_dir, space=space, settings=settings, storage=url)


def _duplicate_of_earlier(study: Any, trial: Any, uniform: dict[str, Any]) -> bool:
    """The uniform trial again (enqueued by two workers starting together), when an earlier trial has it."""
    if trial.params != uniform:
        return False
    return any(t.number < trial.number and t.params == trial.params and t.state.name in ("COMPLETE", "RUNNING")
               for t in study.get_trials(deepcopy=False))


def _count_complete(study: Any) -> int:
    return sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False))


def _trial_text(t: TrialRecord, kind: str) -> str:
    if t.proxy_map is None:
        return t.state.lower()
    return f"mAP {t.proxy_map:.3f}, {kind} {t.cost(kind):.1%}"


def _redact(url: str) -> str:
    """A storage URL without its password (it goes into reports and errors)."""
    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url)



# --------------------------------------------------------------------------------------------
# from the chosen trial to a deployable model


@dataclass
class Delivery:
    """The chosen trial, retrained and checked on the validation split."""

    pruned: Path  # the chosen cut, recovered (before retraining)
    checkpoint: Path  # retrained
    dense_val_map: float
    val_map: float
    macs_ratio: float | None
    latency_ratio: float | None
    met: bool
    miss: str = ""
    onnx: Path | None = None
    int8: Path | None = None
    ultralytics: Path | None = None
    notes: list[str] = field(default_factory=list)


def rebuild_trial(dense: nn.Module, recipe: Recipe, trial: TrialRecord, settings: SearchSettings,
                  space: SearchSpace | None = None) -> tuple[nn.Module, PruneResult]:
    """The chosen trial's cut and recovery again through the same pipeline job: its recorded
    per-group ratios as a :class:`~surgery.pruning.budget.CutRatio` (the same widths, channels and
    MACs), or, for a trial without them, its parameters searched again (``space``: the one searched)."""
    allocator = Allocator(dense, recipe.prune, settings.macs_input_size, settings.trace_size, space or SearchSpace())
    cfg = TrialConfig.from_params(trial.params)
    budget = None
    if trial.ratios:  # every prunable group named: 0 for a group the trial did not cut
        overrides = {r: float(trial.ratios.get(r, 0.0)) for r in allocator.roots}
        budget = CutRatio(statistics.fmean(trial.ratios.values()), overrides=overrides)
    needs = cfg.criterion in ("taylor", "fisher")
    calib = calibration_data(recipe.data, batches=recipe.prune.calib_batches, model=dense) if needs else None
    recover_data = calibration_data(recipe.data, batches=settings.recover_batches, batch_size=RECOVER_BATCH_SIZE,
                                    model=dense)
    return cut_and_recover(dense, allocator.job(cfg, settings.recover_batches, budget),
                           macs_input_size=settings.macs_input_size, trace_size=settings.trace_size, calib_data=calib,
                           recover_data=recover_data)


def deliver(
    dense_path: str | Path,
    recipe: Recipe,
    result: SearchResult,
    run_dir: str | Path,
    *,
    settings: SearchSettings,
    space: SearchSpace | None = None,
    device: str = "cpu",
    export: bool = True,
    callbacks: Callbacks | None = None,
) -> Delivery:
    """Retrain the chosen trial with distillation from the dense model (the recipe's ``retrain``
    section; ``retrain.distill`` when set, else feature imitation with the dense checkpoint as
    teacher), verify the goal on the validation split, and write the checkpoint, the ONNX (INT8
    with ``goal.int8``) and, for an Ultralytics YOLO, the Ultralytics file."""
    cb = callbacks or Callbacks()
    if result.chosen is None:
        raise CompressError("no finished trial to deliver")
    run_dir = Path(run_dir)
    dense, ckpt = load_checkpoint(dense_path)
    dense.eval()
    cb.stage(f"cutting trial #{result.chosen.number} again")
    model, pruned = rebuild_trial(dense, recipe, result.chosen, settings, space)
    pruned.plan.source = str(Path(dense_path).resolve())  # --teacher auto finds the dense model through the plan
    pruned.plan.extra["compress"] = {"trial": result.chosen.number, "study": result.study_name,
                                     "proxy_map": result.chosen.proxy_map}
    rec = copy.deepcopy(recipe)
    rec.model.name, rec.model.kwargs = ckpt.spec.name, dict(ckpt.spec.kwargs)
    pruned_path = save_pruned(run_dir / "pruned.pt", model, ckpt.spec, pruned.plan, recipe=rec.to_dict(),
                              metrics={"params": pruned.report.params_after, "macs": pruned.report.macs_after},
                              class_names=ckpt.class_names)
    if rec.retrain.distill is None or rec.retrain.distill.type == "none":
        rec.retrain.distill = DistillSection(type="imitation")
    rec.retrain.distill.teacher = str(Path(dense_path).resolve())
    cb.stage("retraining the chosen trial (distillation from the dense model)")
    outcome = retrain_checkpoint(pruned_path, rec, run_dir / "model.pt", device=device, evaluate=False, callbacks=cb)
    final, _ = load_checkpoint(outcome.out)
    final.eval()
    cb.stage("verifying the goal on the validation split")
    val = dataset_for(recipe.data, "val", train=False)
    dense_val = float(evaluate(dense, val, iou_types=("bbox",)).metrics["mAP"])
    val_map = float(evaluate(final, val, iou_types=("bbox",)).metrics["mAP"])
    goal = result.goal
    lat = (latency_ratio(dense, final, goal.runtime, settings.macs_input_size, runs=settings.latency_runs,
                         rounds=settings.latency_rounds) if goal.cost_kind == "latency" else None)
    record = dataclasses.replace(result.chosen, proxy_map=val_map, latency_ratio=lat if lat is not None else result.chosen.latency_ratio)
    result.chosen.retrained_map = val_map
    met = _violation(record, goal.cost_kind, goal.floor(dense_val), goal.budget) == 0.0
    miss = "" if met else miss_line(record, goal, dense_val).replace("proxy mAP", "validation mAP")
    out = Delivery(pruned=pruned_path, checkpoint=outcome.out, dense_val_map=dense_val, val_map=val_map,
                   macs_ratio=pruned.report.macs_ratio, latency_ratio=lat, met=met, miss=miss)
    if export:
        _export(final, outcome.out, run_dir, goal, settings, out, ckpt.class_names, cb)
    return out


def _export(model: nn.Module, ckpt_path: Path, run_dir: Path, goal: Goal, settings: SearchSettings, out: Delivery,
            class_names: list[str] | None, cb: Callbacks) -> None:
    if find_spec("onnxruntime") is None or find_spec("onnx") is None:
        out.notes.append("no ONNX written: pip install 'surgery[export]'")
    else:
        cb.stage("exporting ONNX" + (" and INT8" if goal.int8 else ""))
        export_onnx(model, run_dir / "model.onnx", settings.macs_input_size)
        out.onnx = run_dir / "model.onnx"
        if goal.int8:
            out.int8 = quantize_checkpoint(ckpt_path, run_dir / "model.int8.onnx").path
    if isinstance(model, UltralyticsDetector):
        out.ultralytics = save_for_ultralytics(model, run_dir / "model.ultralytics.pt", class_names=class_names,
                                               source=str(ckpt_path)).path


# --------------------------------------------------------------------------------------------
# the report: every trial (CSV), the Pareto front (plot), the chosen point and the verdict

TRIAL_COLUMNS = ("trial", "state", "proxy_map", "macs_ratio", "latency_ratio", "params_ratio", "feasible", "pareto",
                 "chosen", "retrained_map", "keep", "criterion", "round_to", "seconds", "worker")


def write_trials_csv(result: SearchResult, path: str | Path) -> Path:
    front = {t.number for t in result.pareto()}
    chosen = result.chosen.number if result.chosen is not None else None
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRIAL_COLUMNS)
        for t in sorted(result.trials, key=lambda t: t.number):
            w.writerow([t.number, t.state, _fmt(t.proxy_map), _fmt(t.macs_ratio), _fmt(t.latency_ratio),
                        _fmt(t.params_ratio), "" if t.feasible is None else int(t.feasible), int(t.number in front),
                        int(t.number == chosen), _fmt(t.retrained_map), _fmt(t.params.get("keep")),
                        t.params.get("criterion", ""), t.params.get("round_to", ""), t.seconds or "", t.worker])
    return Path(path)


def _fmt(x: Any) -> str:
    return "" if x is None else f"{float(x):.5f}"


def plot_pareto(result: SearchResult, path: str | Path) -> Path:
    """Proxy mAP against cost for every finished trial, the front joined, the chosen one ringed."""
    import matplotlib  # only for the plot

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    kind = result.goal.cost_kind
    done = [t for t in result.complete if t.proxy_map is not None]
    front = sorted(result.pareto(), key=lambda t: t.cost(kind))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([t.cost(kind) for t in done], [t.proxy_map for t in done], s=14, c="0.6", label="trials")
    ax.plot([t.cost(kind) for t in front], [t.proxy_map for t in front], "o-", c="C0", ms=5, label="Pareto front")
    if result.chosen is not None and result.chosen.proxy_map is not None:
        c = result.chosen
        ax.scatter([c.cost(kind)], [c.proxy_map], s=120, facecolors="none", edgecolors="C3", label=f"chosen #{c.number}")
    if result.goal.budget is not None:
        ax.axvline(result.goal.budget, ls="--", c="C1", lw=1, label="budget")
    floor = result.goal.floor(result.dense_map)
    if floor is not None:
        ax.axhline(floor, ls=":", c="C2", lw=1, label="floor")
    ax.set_xlabel(f"{kind} kept (fraction of dense)")
    ax.set_ylabel("proxy mAP (held-out calibration split, after recovery)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return out


def report_text(result: SearchResult, delivery: Delivery | None) -> str:
    """The report (markdown): goal, search, chosen point, verdict; never a goal claimed that was missed."""
    g, kind, c = result.goal, result.goal.cost_kind, result.chosen
    lines = [f"# surgery compress: {g.describe()}", "",
             f"- study `{result.study_name}` at `{result.storage}`: {len(result.complete)} finished trials "
             f"({len(result.ran)} run by this worker), {result.seconds / 60:.1f} min",
             f"- dense proxy mAP (held-out calibration split): {result.dense_map:.4f}",
             f"- Pareto front: {', '.join(f'#{t.number}' for t in sorted(result.pareto(), key=lambda t: t.number))}"]
    if c is None:
        return "\n".join([*lines, "", "**Goal not met**: no trial finished."]) + "\n"
    lines.append(f"- chosen trial #{c.number}: proxy mAP {c.proxy_map:.4f}, {kind} {c.cost(kind):.1%} of dense, "
                 f"params {c.params_ratio:.1%}; {c.params.get('criterion')}, round_to {c.params.get('round_to')}")
    if not result.met:
        lines += ["", f"**Goal not met in the search**: {result.miss}. Nothing was retrained."]
    elif delivery is not None:
        lines.append(f"- retrained: validation mAP {delivery.val_map:.4f} vs dense {delivery.dense_val_map:.4f} "
                     f"({delivery.val_map / max(1e-9, delivery.dense_val_map):.1%})"
                     + (f"; latency {delivery.latency_ratio:.1%} of dense" if delivery.latency_ratio is not None else ""))
        lines += ["", "**Goal met on the validation split.**" if delivery.met
                  else f"**Goal not met on the validation split**: {delivery.miss}."]
        files = [delivery.checkpoint, delivery.onnx, delivery.int8, delivery.ultralytics]
        lines += ["", "Files: " + ", ".join(f"`{Path(f).name}`" for f in files if f is not None)]
        lines += [f"- {n}" for n in delivery.notes]
    return "\n".join(lines) + "\n"


def write_report(result: SearchResult, delivery: Delivery | None, run_dir: str | Path) -> dict[str, Path]:
    """trials.csv, pareto.png and report.md in ``run_dir``, each written atomically."""
    run_dir = Path(run_dir)
    files = {"csv": write_trials_csv(result, run_dir / "trials.csv"), "plot": plot_pareto(result, run_dir / "pareto.png")}
    with atomic_open(run_dir / "report.md", "w") as f:
        f.write(report_text(result, delivery))
    files["report"] = run_dir / "report.md"
    return files


__all__ = [
    "Allocator",
    "CompressError",
    "Delivery",
    "deliver",
    "plot_pareto",
    "rebuild_trial",
    "report_text",
    "write_report",
    "write_trials_csv",
    "Goal",
    "SearchResult",
    "SearchSettings",
    "SearchSpace",
    "TrialConfig",
    "TrialRecord",
    "choose",
    "cut_and_recover",
    "latency_ratio",
    "miss_line",
    "open_study",
    "resolve_sensitivity",
    "search",
    "stages_of",
    "storage_url",
]
