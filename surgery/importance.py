"""Filter importance of a coupled channel group: one score per channel of the group's root.

Registry of criteria (``list_importances()`` feeds the CLI's ``--method`` and the tests):

- ``l1`` (Li et al. 2016): L1 norm of every coupled filter *and* every consumer's input slice,
  averaged over the group (Torch-Pruning's ``GroupMagnitudeImportance``, restricted to conv and
  linear weights so the score is a pure filter norm).
- ``l2``: the same with the L2 norm.
- ``bn``: |gamma| of the group's norm layers (network-slimming style). Torch-Pruning's
  ``BNScaleImportance`` misses ``FrozenBatchNorm2d`` (gamma is a buffer there) and GroupNorm, so
  it is computed here; groups without a norm layer fall back to ``l1``.
- ``taylor`` / ``fisher``: data-driven (first-order Taylor, GroupFisher) over a few batches of
  the detection loss; they need calibration data and are computed by :mod:`surgery.calibrate`
  (``needs_data(name)`` says which criteria do).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from .errors import PruningError
from .graph import ChannelGroup

Importance = Callable[[ChannelGroup], torch.Tensor]

_WEIGHT_TYPES = [nn.modules.conv._ConvNd, nn.Linear]
_l1 = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None, target_types=_WEIGHT_TYPES)
_l2 = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None, target_types=_WEIGHT_TYPES)


def _magnitude(scorer: tp.importance.GroupMagnitudeImportance) -> Importance:
    def score(group: ChannelGroup) -> torch.Tensor:
        with torch.no_grad():
            imp = scorer(group.tp_group)
        if imp is None:  # no conv/linear weights in the group (should not happen for a conv root)
            return torch.ones(group.channels)
        return imp.detach().float().cpu()

    return score


def _norm_scale(group: ChannelGroup) -> torch.Tensor:
    from .graph import NORM_TYPES

    dg = group.tp_group._DG
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
    return score if found else _IMPORTANCES["l1"](group)


def _needs_calibration(name: str) -> Importance:
    def score(group: ChannelGroup) -> torch.Tensor:
        raise PruningError(
            f"method {name!r} ranks channels with calibration data: pass calib_data to prune_model "
            "(CLI: --data, recipe data section) or use surgery.calibrate.group_scores"
        )

    return score


_IMPORTANCES: dict[str, Importance] = {
    "l1": _magnitude(_l1),
    "l2": _magnitude(_l2),
    "bn": _norm_scale,
    "taylor": _needs_calibration("taylor"),
    "fisher": _needs_calibration("fisher"),
}
_DATA_DRIVEN = frozenset({"taylor", "fisher"})


def needs_data(name: str) -> bool:
    """Whether criterion ``name`` ranks with calibration batches (see :mod:`surgery.calibrate`)."""
    return name in _DATA_DRIVEN


def list_importances() -> list[str]:
    return list(_IMPORTANCES)


def get_importance(name: str) -> Importance:
    try:
        return _IMPORTANCES[name]
    except KeyError:
        raise PruningError(
            f"unknown ranking method {name!r}: choose one of {', '.join(_IMPORTANCES)} "
            "(or 'magnitude' for masked weight pruning)"
        ) from None
