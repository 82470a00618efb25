"""Filter importance of a coupled channel group: one score per channel of the group's root.

Criteria live in one registry, :data:`IMPORTANCES`; :func:`list_importances` feeds recipe
validation (``prune.method``), the CLI's help text and the tests:

- ``l1`` (Li et al. 2016): L1 norm of every coupled filter *and* every consumer's input slice,
  averaged over the group (Torch-Pruning's ``GroupMagnitudeImportance``, restricted to conv and
  linear weights so the score is a pure filter norm).
- ``l2``: the same with the L2 norm.
- ``bn``: |gamma| of the group's norm layers (network-slimming style). Torch-Pruning's
  ``BNScaleImportance`` misses ``FrozenBatchNorm2d`` (gamma is a buffer there) and GroupNorm, so
  it is computed here; groups without a norm layer fall back to ``l1``.
- ``taylor`` / ``fisher``: data-driven (first-order Taylor, GroupFisher) over a few batches of
  the detection loss; they need calibration data and are computed by :mod:`surgery.pruning.calibrate`
  (``needs_data(name)`` says which criteria do).

A new criterion is a function ``score(group: ChannelGroup) -> Tensor[group.channels]`` (higher =
more important) registered with :func:`register_importance`. One that ranks from data (Taylor,
Fisher) registers with ``needs_data=True``: the caller then runs calibration batches through the
model (forward and backward of the detection loss, gradients accumulated on the parameters)
before asking for scores, and may refuse to prune with it when it has no data
(:func:`needs_data`). This module imports nothing heavy until a score is computed, so listing the
criteria is cheap.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import compat
from ..errors import PruningError
from ..registry import Registry

if TYPE_CHECKING:
    import torch

    from .graph import ChannelGroup

Importance = Callable[["ChannelGroup"], "torch.Tensor"]

MASKED_METHOD = "magnitude"  # prune.method for masked (unstructured) pruning, not a channel criterion


@dataclass(frozen=True)
class Criterion:
    """A registered channel-ranking criterion."""

    name: str
    score: Importance
    needs_data: bool = False  # True: needs calibration batches (gradients) before scoring
    description: str = ""


IMPORTANCES: Registry[Criterion] = Registry(
    "ranking method", PruningError, hint=f"(or {MASKED_METHOD!r} for masked weight pruning)"
)


def register_importance(name: str, *, needs_data: bool = False, description: str = "") -> Callable[[Importance], Importance]:
    """Decorator adding a criterion to :data:`IMPORTANCES` (see the module docstring)."""
    return IMPORTANCES.register(name, lambda fn: Criterion(name, fn, needs_data, description))


def list_importances(*, needs_data: bool | None = None) -> list[str]:
    """Names of the registered criteria (only those that do / do not need data, if asked)."""
    return [n for n in IMPORTANCES if needs_data is None or IMPORTANCES.get(n).needs_data == needs_data]


def get_criterion(name: str) -> Criterion:
    """The registered criterion; an unknown name is a :class:`PruningError` listing the choices."""
    return IMPORTANCES.get(name)


def get_importance(name: str) -> Importance:
    """The scoring function of criterion ``name``."""
    return get_criterion(name).score


def needs_data(name: str) -> bool:
    return get_criterion(name).needs_data


def pruning_methods() -> list[str]:
    """Every valid ``prune.method``: the structured criteria, then the masked method."""
    return [*list_importances(), MASKED_METHOD]


def method_help() -> str:
    """One line for a ``--method`` option: ``"l1 | l2 | bn (structured) or magnitude (masked)"``."""
    return f"{' | '.join(list_importances())} (structured) or {MASKED_METHOD} (masked)"


# --------------------------------------------------------------------------------------------
# built-in criteria


@functools.cache
def _group_magnitude(p: int) -> Any:
    import torch_pruning as tp
    from torch import nn

    weight_types = [nn.modules.conv._ConvNd, nn.Linear]
    return tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None, target_types=weight_types)


def _magnitude(p: int) -> Importance:
    def score(group: ChannelGroup) -> torch.Tensor:
        import torch

        with torch.no_grad():
            imp = _group_magnitude(p)(group.tp_group)
        if imp is None:  # no conv/linear weights in the group (should not happen for a conv root)
            return torch.ones(group.channels)
        return imp.detach().float().cpu()

    return score


IMPORTANCES.add("l1", Criterion("l1", _magnitude(1), description="L1 norm of the coupled filters (Li et al. 2016)"))
IMPORTANCES.add("l2", Criterion("l2", _magnitude(2), description="L2 norm of the coupled filters"))


@register_importance("bn", description="|gamma| of the group's norm layers (network slimming); l1 without one")
def _norm_scale(group: ChannelGroup) -> torch.Tensor:
    import torch

    from .graph import NORM_TYPES  # torch-free import: `surgery prune --help` lists the criteria

    dg = compat.tp_group_graph(group.tp_group)
    score = torch.zeros(group.channels)
    found = False
    for item in group.tp_group:
        dep, idxs = item.dep, item.idxs
        layer = dep.target.module
        if not isinstance(layer, NORM_TYPES) or not dg.is_out_channel_pruning_fn(dep.handler):
            continue
        gamma = getattr(layer, "weight", None)
        if gamma is None:
            continue
        root = torch.as_tensor(item.root_idxs, dtype=torch.long)
        vals = gamma.detach().abs().float().cpu()[torch.as_tensor(idxs, dtype=torch.long)]
        score.scatter_add_(0, root, vals)
        found = True
    return score if found else get_importance("l1")(group)


def _needs_calibration(name: str) -> Importance:
    def score(group: ChannelGroup) -> torch.Tensor:
        raise PruningError(
            f"method {name!r} ranks channels with calibration data: pass calib_data to prune_model "
            "(CLI: --data, recipe data section) or use surgery.pruning.calibrate.group_scores"
        )

    return score


register_importance("taylor", needs_data=True, description="|first-order Taylor| of the detection loss over calibration batches")(
    _needs_calibration("taylor")
)
register_importance("fisher", needs_data=True, description="group Fisher (GroupFisher) over calibration batches")(
    _needs_calibration("fisher")
)
