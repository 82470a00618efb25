"""Budgets: how much a structured prune cuts, as a type, resolved once.

A budget says *how much*; its type decides *which allocator* spreads it over the coupled groups
(:data:`surgery.pruning.prune.ALLOCATORS` lists them, one per type):

- :class:`CutRatio` - a fraction of each group's channels CUT (uniform, or one global ranking);
- :class:`KeepMacs` / :class:`KeepParams` - a fraction of the dense MACs / parameters KEPT: the
  cut ratio is searched (:mod:`surgery.pruning.target`);
- :class:`KeepLatency` - a fraction of the dense network latency KEPT on a runtime: per-group
  widths from a measured latency table (:mod:`surgery.pruning.latency`);
- :class:`Sensitivity` - a fraction of the MACs KEPT, spread by a `surgery sensitivity` table
  (:mod:`surgery.pruning.sensitivity`).

:class:`Rounding` is the one width setting every allocator obeys. :class:`PruneJob` holds every
stage's arguments (rank, allocate, cut, recover); :func:`from_config` is the single place where a
recipe's ``prune`` section and the flags a user gave become a job: every combination either
applies or is refused there, with one error naming what was given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from ..errors import PruningError
from .importance import needs_data

if TYPE_CHECKING:  # annotations only: the recipe reads its recovery defaults from Recovery below
    from ..config.recipe import AnchorSection, PruneSection


def _fraction(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise PruningError(f"{what} must be a fraction strictly between 0 and 1, got {value!r}")


def _input_size(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise PruningError(f"{what} must be a positive image side in pixels, got {value!r}")


def _overrides(overrides: Mapping[str, float]) -> None:
    for k, v in overrides.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise PruningError(f"override {k}={v!r}: the ratio must be a number in [0, 1)")


@dataclass(frozen=True)
class CutRatio:
    """Cut ``ratio`` of every prunable group's channels (``global_ranking``: that fraction of all
    channels, below one threshold over mean-normalised scores); ``overrides``: layer glob -> ratio."""

    ratio: float
    global_ranking: bool = False
    overrides: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _fraction(self.ratio, "the cut ratio")
        _overrides(self.overrides)


@dataclass(frozen=True)
class KeepMacs:
    """Keep ``fraction`` of the dense MACs, counted on one ``input_size`` square image: the cut
    ratio (uniform or global, overrides keep theirs) is searched.

    ``group_weights`` (group root -> weight > 0; groups not named weigh 1) shapes the cut: the
    searched ratio ``r`` cuts each group by ``min(0.9, r * weight / lightest weight)``, so the
    relative cut between groups is fixed and only its scale is searched (`surgery compress`'s
    trials). ``tol``: the relative miss of the fraction accepted on a verified cut; ``at_most``: the
    fraction is a ceiling (the cut returned is the closest at or below it, within ``tol``, when the
    search verified one)."""

    fraction: float
    input_size: int
    global_ranking: bool = False
    overrides: Mapping[str, float] = field(default_factory=dict)
    group_weights: Mapping[str, float] = field(default_factory=dict)
    tol: float = 0.02
    at_most: bool = False

    def __post_init__(self) -> None:
        _fraction(self.fraction, "the MACs fraction to keep")
        _input_size(self.input_size, "the MACs input size")
        _overrides(self.overrides)
        _fraction(self.tol, "the MACs tolerance")
        for k, v in self.group_weights.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < math.inf:
                raise PruningError(f"group weight {k}={v!r}: a weight is a positive number")
        if self.group_weights and self.global_ranking:
            raise PruningError("group weights set each group's ratio: they do not combine with a global ranking")


@dataclass(frozen=True)
class KeepParams:
    """Keep ``fraction`` of the parameters: the cut ratio is searched."""

    fraction: float
    global_ranking: bool = False
    overrides: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _fraction(self.fraction, "the parameter fraction to keep")
        _overrides(self.overrides)


RUNTIMES = ("onnxruntime", "openvino", "torch")  # where a latency table is measured: surgery.pruning.latency_table.RUNTIMES


@dataclass(frozen=True)
class KeepLatency:
    """Keep ``fraction`` of the dense network latency on ``runtime``, timed at ``input_size``."""

    fraction: float
    runtime: str = "onnxruntime"
    input_size: int = 320
    overrides: Mapping[str, float] = field(default_factory=dict)
    device: str = "cpu"  # cuda: the table and the verification on the GPU (runtime torch)

    def __post_init__(self) -> None:
        _fraction(self.fraction, "the latency fraction to keep")
        if self.runtime not in RUNTIMES:
            raise PruningError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.device not in ("cpu", "cuda") or (self.device == "cuda" and self.runtime != "torch"):
            raise PruningError(f"latency device {self.device!r}: cpu, or cuda with runtime torch (got {self.runtime})")
        _input_size(self.input_size, "the latency input size")
        _overrides(self.overrides)


@dataclass(frozen=True)
class Sensitivity:
    """Keep ``keep_macs`` of the dense MACs (at ``input_size``), cutting the groups the sensitivity
    ``table`` (a CSV from `surgery sensitivity`) found insensitive the most."""

    table: str
    keep_macs: float
    input_size: int

    def __post_init__(self) -> None:
        if not self.table:
            raise PruningError("a sensitivity budget needs the CSV `surgery sensitivity` wrote")
        _fraction(self.keep_macs, "the MACs fraction to keep")
        _input_size(self.input_size, "the MACs input size")


Budget = Union[CutRatio, KeepMacs, KeepParams, KeepLatency, Sensitivity]  # noqa: UP007 - a runtime alias


@dataclass(frozen=True)
class Rounding:
    """How kept widths are rounded: up to a multiple of ``round_to`` (thin groups to less unless
    ``strict``, :func:`surgery.pruning.allocate.thin_round_to`) and of ``multiple_of``, never below
    ``min_channels``. GroupNorm and chunk multiples of each group apply on top."""

    round_to: int = 1
    min_channels: int = 8
    multiple_of: int = 1
    strict: bool = False

    def __post_init__(self) -> None:
        for name in ("round_to", "min_channels", "multiple_of"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096:
                raise PruningError(f"{name} must be an integer in [1, 4096], got {v!r}")

    @property
    def step(self) -> int:
        """The multiple every kept width is rounded to (before a group's own multiple)."""
        return math.lcm(self.round_to, self.multiple_of)


@dataclass(frozen=True)
class Recovery:
    """Recovery without retraining after the cut: ``method`` (a name in
    :data:`surgery.pruning.prune.RECOVERY_METHODS`) on ``batches`` calibration batches.

    Its defaults are the only copy: the recipe's ``prune.recover_*`` keys, ``surgery recover``'s
    flags and :mod:`surgery.pruning.recover` / :mod:`surgery.pruning.reconstruct` read them here."""

    # Calibration batches the shipped recipes use (prune.recover) and recover()'s default. 16 batches =
    # 128 images: with 4 (32 images) the deep layers' fits (a 4x4 map at 128 px, up to ~2300 unknowns
    # per output) over-fit the calibration images. Measured in docs/accuracy.md (issue 17, session 3):
    # mAP after recovery, no retraining, 4 -> 16 batches, on the quickstart FCOS 0.654 -> 0.663 (50%
    # MACs cut) and 0.601 -> 0.615 (75%), YOLOv8n 0.517 -> 0.538 and 0.315 -> 0.364, YOLO11n (data
    # seed 1) 0.388 -> 0.389 and 0.224 -> 0.234; 32 batches adds a little more at twice the time.
    batches: int = 16
    method: str = "refit"
    # the "reconstruct" method's budget (prune.recover_steps / recover_seconds / recover_lr): Adam
    # steps after the re-fit, a wall-clock limit on the whole recovery (re-fit included), the learning rate.
    # 600 steps with augmented views: the held-out error still fell at 300 on YOLOv8n (issue 27's second
    # run, docs/benchmarks/label-free-recovery.md); 300 s: the budget (5 minutes on 2 CPU cores)
    steps: int = 600
    seconds: float = 300.0
    lr: float = 1e-4

    def __post_init__(self) -> None:
        if isinstance(self.batches, bool) or not isinstance(self.batches, int) or not 1 <= self.batches <= 10_000:
            raise PruningError(f"recovery needs a number of calibration batches in [1, 10000], got {self.batches!r}")


@dataclass(frozen=True)
class PruneJob:
    """Every stage's arguments: rank (``method``, ``calib_batches``), allocate (``budget``,
    ``rounding``), cut (``skip``, ``anchors``), recover (``recovery``, None: off)."""

    budget: Budget
    method: str = "l1"
    rounding: Rounding = field(default_factory=Rounding)
    skip: tuple[str, ...] = ()
    anchors: AnchorSection | None = None
    calib_batches: int = 4
    recovery: Recovery | None = None

    @property
    def global_ranking(self) -> bool:
        return bool(getattr(self.budget, "global_ranking", False))

    @property
    def overrides(self) -> dict[str, float]:
        return dict(getattr(self.budget, "overrides", {}))


# --------------------------------------------------------------------------------------------
# the one place a recipe section and flags become a job

# section fields that only masked pruning (method magnitude) reads, and those only a structured cut reads
MASKED_ONLY = ("sparsity", "scope", "agp")
STRUCTURED_ONLY = ("ratio", "global_ranking", "round_to", "min_channels", "overrides", "skip", "keep_head", "anchors",
                   "target_macs", "target_params", "target_latency", "runtime", "allocation", "sensitivity",
                   "recover", "calib_batches", "macs_input_size")
# budgets: the fields that each say how much to cut (at most one may be given)
AMOUNTS = ("ratio", "target_macs", "target_params", "target_latency")


def from_config(cfg: PruneSection, *, given: Mapping[str, str] | None = None,
                macs_input_size: int | None = None, latency_size: int | None = None) -> PruneJob:
    """The :class:`PruneJob` a structured ``prune`` section asks for.

    ``given``: the section fields the user set explicitly, each with how they spelled it (CLI:
    ``{"sparsity": "--sparsity"}``), so a value that would be ignored is refused by its name
    rather than dropped. ``macs_input_size``: the image side MACs are counted on (the recipe's
    ``bench.input_size``; also where a latency budget is timed, else at ``latency_size``)."""
    given = dict(given or {})
    check_combination(cfg, given, macs_input_size)
    if cfg.method == "magnitude":
        raise PruningError("method 'magnitude' is masked weight pruning: use surgery.pruning.masked.prune_masked")
    rounding = Rounding(cfg.round_to, cfg.min_channels, strict=cfg.strict_round_to)
    recovery = (Recovery(cfg.recover, cfg.recover_method, cfg.recover_steps, cfg.recover_seconds, cfg.recover_lr)
                if cfg.recover > 0 else None)
    return PruneJob(budget=budget_of(cfg, macs_input_size, latency_size), method=cfg.method, rounding=rounding,
                    skip=tuple(cfg.skip), anchors=cfg.anchors, calib_batches=cfg.calib_batches, recovery=recovery)


def budget_of(cfg: PruneSection, macs_input_size: int | None, latency_size: int | None = None) -> Budget:
    """The budget a (validated) structured section describes."""
    overrides = dict(cfg.overrides)
    global_ranking = cfg.global_ranking or cfg.allocation == "global"  # the flag and the allocation's name
    if cfg.allocation == "sensitivity":
        return Sensitivity(str(cfg.sensitivity), _needs(cfg.target_macs, "target_macs"),
                           _needs(macs_input_size, "a MACs input size (the recipe's bench.input_size)"))
    if cfg.target_latency is not None:
        return KeepLatency(cfg.target_latency, cfg.runtime, macs_input_size or latency_size or 320, overrides,
                           device=cfg.latency_device)
    if cfg.target_macs is not None:
        size = _needs(macs_input_size, "macs_input_size (the recipe's bench.input_size) to count MACs")
        return KeepMacs(cfg.target_macs, size, global_ranking, overrides)
    if cfg.target_params is not None:
        return KeepParams(cfg.target_params, global_ranking, overrides)
    return CutRatio(cfg.ratio, global_ranking, overrides)


def _needs(value: Any, what: str) -> Any:
    if value is None:
        raise PruningError(f"this budget needs {what}")
    return value


def check_combination(cfg: PruneSection, given: Mapping[str, str], macs_input_size: int | None) -> None:
    """Refuse what would be silently ignored or contradict itself (one error, naming the settings
    as the user spelled them; fields not in ``given`` are named ``prune.FIELD``)."""

    def name(key: str) -> str:
        return given.get(key, f"prune.{key}")

    if "macs_input_size" in given:
        _input_size(macs_input_size, name("macs_input_size"))
    masked = cfg.method == "magnitude"
    wrong = [k for k in (STRUCTURED_ONLY if masked else MASKED_ONLY) if k in given]
    if wrong:
        if masked:
            raise PruningError(f"{name(wrong[0])} applies to a structured cut, not to method magnitude (masked "
                               f"pruning: the fraction of weights zeroed is {name('sparsity')})")
        raise PruningError(f"{name(wrong[0])} applies to masked pruning only: add {given.get('method', '--method')} "
                           "magnitude, or drop it (a structured cut takes a ratio or a keep budget)")
    if masked:
        return
    amounts = [k for k in AMOUNTS if k in given]
    if cfg.allocation == "sensitivity" and "ratio" in given:
        amounts.append("allocation")
    if len(amounts) > 1:
        raise PruningError(f"{name(amounts[0])} and {name(amounts[1])} both say how much to cut: give one")
    if cfg.sensitivity and cfg.allocation != "sensitivity":
        raise PruningError(f"{name('sensitivity')} is read by allocation 'sensitivity' only: add "
                           f"{given.get('allocation', 'prune.allocation')} sensitivity, or drop it")
    if "runtime" in given and cfg.target_latency is None:
        raise PruningError(f"{name('runtime')} is where a latency budget is timed: add {name('target_latency')}")
    if cfg.target_latency is not None and cfg.global_ranking:
        raise PruningError(f"{name('global_ranking')} does not apply to a latency budget (it ranks importance per "
                           "millisecond saved across all groups already)")
    if cfg.target_latency is not None and cfg.allocation == "sensitivity":
        raise PruningError(f"{name('target_latency')} and allocation 'sensitivity' are two allocations: give one")
    if cfg.allocation == "sensitivity" and cfg.overrides:
        raise PruningError(f"{name('overrides')} do not apply with allocation 'sensitivity' (the table sets every "
                           "group's ratio): drop them, or --skip the layers to keep whole")
    if "calib_batches" in given and not needs_data(cfg.method):
        raise PruningError(f"{name('calib_batches')} is read by the data-driven criteria (taylor, fisher) only, "
                           f"not by {cfg.method!r}")


__all__ = ["Budget", "CutRatio", "KeepLatency", "KeepMacs", "KeepParams", "PruneJob", "Recovery", "Rounding",
           "Sensitivity", "budget_of", "check_combination", "from_config"]
