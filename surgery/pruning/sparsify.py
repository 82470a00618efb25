"""Prune-aware sparse training before the cut: group lasso over coupled groups, network slimming.

A cut removes whole channels of every layer of a coupled group (:mod:`surgery.pruning.graph`). If those
channels are already near zero everywhere when the cut happens, the cut costs almost nothing.
:class:`SparsityHook` is a trainer hook (:mod:`surgery.training.hooks`) that trains a dense model towards
that state:

- **group lasso** (DepGraph / Torch-Pruning's ``GroupNormPruner``): for every prunable group and
  every channel ``c`` of it, the L2 norm of the vector of all its coupled slices (the producers'
  output filters and biases, the norms' gamma and beta, the consumers' input slices), summed over
  channels;
- **network slimming** (Liu et al. 2017): the L1 norm of the norm layers' gammas.

Both are applied as their *proximal* step after each optimizer step (block soft-thresholding:
``w_c <- w_c * max(0, 1 - tau / ||w_c||)``; ``gamma <- sign * max(0, |gamma| - tau)``), not as a
gradient: the gradient of a lasso term under Adam is rescaled per element and never reaches zero,
while the proximal step is the same whatever the optimizer (like AdamW's decoupled weight decay).

**Scale-normalised.** ``tau`` is a fraction of each group's own mean channel norm measured when
sparse training starts, and the per-step fractions of the whole run add up to ``weight``. So
``weight: 1`` means "a channel of the group's average size that no gradient defends reaches zero
by the last step", whatever the family, the weight scale, the learning rate or the number of steps.
``tau`` is zero during ``warmup_steps`` and then grows linearly (growing regularisation, Wang et
al. ICLR 2021): early steps let the network move importance away from the channels being shrunk.

**Targeted** (the default when the hook knows the pruning ratio, as in the sweep's ``+sparse``
variants): only the channels the cut will remove at that ratio (ranked by the prune section's
criterion on the weights at the start, ``plan_channels``) are shrunk; the rest train freely.
Untargeted (``targeted: false`` or no ratio), every channel of every prunable group is penalised
and the cut's ranking picks the ones that went to zero.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import compat
from ..errors import RecipeError
from ..training.hooks import HookBase
from .graph import LAYER_TYPES, NORM_TYPES, trace
from .importance import needs_data
from .masked import unwrap
from .prune import plan_channels

if TYPE_CHECKING:
    from ..config.recipe import PruneSection, SparsifySection
    from ..training.train import Trainer
    from .graph import DetectorGraph


@dataclass
class _Slice:
    """The part of one parameter that belongs to a group: ``param.index_select(dim, idxs)``,
    row ``k`` belonging to the group's root channel ``root[k]``."""

    name: str  # parameter name in the model
    dim: int
    idxs: torch.Tensor
    root: torch.Tensor
    norm: bool = False  # a norm layer's gamma (network slimming)


@dataclass
class _Group:
    root: str
    channels: int
    slices: list[_Slice]
    scale: float = 1.0  # mean channel norm at the start
    gamma_scale: float = 0.0  # mean |gamma| at the start (0: no norm layer)
    targets: torch.Tensor | None = None  # channels shrunk (None: all)


def _param_slices(dg: Any, group: Any, names: dict[nn.Module, str]) -> list[_Slice]:
    """Every parameter slice of a Torch-Pruning group, with the root channel of each index."""

    out: list[_Slice] = []
    for item in group:
        dep, idxs = item.dep, item.idxs
        layer = dep.target.module
        if not isinstance(layer, nn.Module) or layer not in names:
            continue
        is_out = dg.is_out_channel_pruning_fn(dep.handler)
        is_in = dg.is_in_channel_pruning_fn(dep.handler)
        if not (is_out or is_in):
            continue
        idx = torch.as_tensor(list(idxs), dtype=torch.long)
        root = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        prefix = names[layer]
        if isinstance(layer, LAYER_TYPES):
            transposed = bool(getattr(layer, "transposed", False))
            groups = int(getattr(layer, "groups", 1))
            if is_out:
                out.append(_Slice(f"{prefix}.weight", 1 if transposed else 0, idx, root))
                if getattr(layer, "bias", None) is not None:
                    out.append(_Slice(f"{prefix}.bias", 0, idx, root))
            elif groups == 1:  # grouped convs' input slices index per group: left to their producer
                out.append(_Slice(f"{prefix}.weight", 0 if transposed else 1, idx, root))
        elif isinstance(layer, NORM_TYPES) and is_out:
            w = getattr(layer, "weight", None)
            if isinstance(w, nn.Parameter) and w.ndim == 1:
                out.append(_Slice(f"{prefix}.weight", 0, idx, root, norm=True))
            b = getattr(layer, "bias", None)
            if isinstance(b, nn.Parameter) and b.ndim == 1:
                out.append(_Slice(f"{prefix}.bias", 0, idx, root))
    return out


def coupled_groups(model: nn.Module, *, trace_size: int = 256, skip: list[str] | None = None) -> tuple[DetectorGraph, list[_Group]]:
    """Trace a CPU copy of ``model`` and return its graph and every prunable group's parameter
    slices, named as in ``model`` (the copy keeps the names)."""

    clone = copy.deepcopy(unwrap(model)).cpu()
    graph = trace(clone, trace_size=trace_size, skip=skip or [])
    names = compat.tp_module_names(graph.dg)
    groups = []
    for g in graph.groups:
        if not g.prunable:
            continue
        slices = _param_slices(graph.dg, g.tp_group, names)
        if slices:
            groups.append(_Group(g.root, g.channels, slices))
    return graph, groups


def channel_norms(model: nn.Module, group: _Group) -> torch.Tensor:
    """The group-lasso norm of each root channel: the L2 norm over all its coupled slices."""
    params = dict(model.named_parameters())
    sq = None
    for s in group.slices:
        p = params[s.name].detach()
        rows = p.index_select(s.dim, s.idxs.to(p.device)).movedim(s.dim, 0).reshape(len(s.idxs), -1)
        part = torch.zeros(group.channels, device=p.device, dtype=torch.float32)
        part.scatter_add_(0, s.root.to(p.device), rows.float().pow(2).sum(1))
        sq = part if sq is None else sq + part
    assert sq is not None
    return sq.sqrt()


def _gammas(model: nn.Module, group: _Group) -> torch.Tensor | None:
    params = dict(model.named_parameters())
    vals = [params[s.name].detach().abs().float().index_select(0, s.idxs.to(params[s.name].device))
            for s in group.slices if s.norm]
    return torch.cat(vals) if vals else None


def group_lasso(model: nn.Module, groups: list[_Group]) -> float:
    """Sum over groups and channels of each channel's norm / its group's start scale (the
    quantity the hook drives down; ~ the number of channels at the start)."""
    with torch.no_grad():
        return float(sum(float(channel_norms(model, g).sum()) / max(g.scale, 1e-12) for g in groups))


def growing_fraction(step: int, total: int, warmup: int) -> float:
    """This step's share of the run's total shrink: 0 during the warm-up, then linear growth;
    the shares of steps ``warmup .. total-1`` add up to 1."""
    n = total - warmup
    if step < warmup or n <= 0:
        return 0.0
    k = step - warmup + 1
    return 2.0 * k / (n * (n + 1))


def check_target_ratio(ratio: float | None, what: str = "--ratio") -> None:
    """A cut ratio to target: ``None`` or a finite fraction strictly between 0 and 1 (1 would cut
    every channel, 0 none; a larger value is no cut at all), else one :class:`RecipeError` line."""
    if ratio is None:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio < 1:
        raise RecipeError(f"{what} {ratio!r}: the cut ratio to target must be a number strictly between 0 and 1 (e.g. 0.5)")


class SparsityHook(HookBase):
    """Trainer hook: group lasso (``cfg.weight``) and norm-gamma L1 (``cfg.norm_weight``) as
    proximal steps on the prunable groups of ``model``; see the module docstring.

    ``prune``: the prune section of the cut that follows (criterion, round_to, skip...) and
    ``ratio``: its channel ratio; with both and ``cfg.targeted``, only the channels that cut will
    remove are shrunk."""

    edits_weights = True  # build_trainer runs it before the checkpoint hook (see there)

    def __init__(self, model: nn.Module, cfg: SparsifySection, *, prune: PruneSection | None = None,
                 ratio: float | None = None, trace_size: int = 256) -> None:
        check_target_ratio(ratio)
        self.cfg = cfg
        self.prune = prune
        self.ratio = ratio
        self.trace_size = trace_size
        self.groups: list[_Group] = []
        self._restored: dict[str, Any] | None = None
        self.start_penalty: float | None = None
        self.penalty: float | None = None
        self._model = model

    @property
    def targeted(self) -> bool:
        return bool(self.cfg.targeted) and self.prune is not None and self.ratio is not None and self.ratio > 0

    def before_train(self, trainer: Trainer) -> None:
        skip = list(self.prune.skip) if self.prune is not None else []
        graph, self.groups = coupled_groups(trainer.module, trace_size=self.trace_size, skip=skip)
        if self._restored is not None:  # a resumed run: the start's scales and targets, not today's
            saved = {g["root"]: g for g in self._restored.get("groups", [])}
            for g in self.groups:
                s = saved.get(g.root)
                if s is not None:
                    g.scale, g.gamma_scale = float(s["scale"]), float(s["gamma_scale"])
                    g.targets = None if s["targets"] is None else torch.as_tensor(s["targets"], dtype=torch.long)
            self.start_penalty = self._restored.get("start_penalty")
            return
        module = trainer.module
        for g in self.groups:
            g.scale = max(float(channel_norms(module, g).mean()), 1e-12)
            gam = _gammas(module, g)
            g.gamma_scale = float(gam.mean()) if gam is not None and gam.numel() else 0.0
        if self.targeted:
            self._choose_targets(graph)
        self.start_penalty = group_lasso(module, self.groups)

    def _choose_targets(self, graph: DetectorGraph) -> None:
        """The channels the cut at ``ratio`` would remove now (its own criterion; data-driven
        criteria fall back to L1, which is what they converge to on channels near zero)."""

        assert self.prune is not None and self.ratio is not None
        cfg = dataclasses.replace(self.prune, ratio=float(self.ratio), target_macs=None, target_params=None)
        if needs_data(cfg.method):
            cfg = dataclasses.replace(cfg, method="l1")
        plan = plan_channels(graph, cfg)
        by_root = {g.root: g for g in graph.groups}
        for g in self.groups:
            cut = plan.get(by_root[g.root].index, [])
            g.targets = torch.as_tensor(cut, dtype=torch.long)

    def after_step(self, trainer: Trainer) -> None:
        warmup = min(self.cfg.warmup_steps, trainer.total_steps - 1)
        frac = growing_fraction(trainer.step - 1, trainer.total_steps, warmup)
        if frac > 0.0:
            self._shrink(trainer.module, frac)
        if trainer.step == trainer.total_steps:
            self.penalty = group_lasso(trainer.module, self.groups)

    @torch.no_grad()
    def _shrink(self, model: nn.Module, frac: float) -> None:
        params = dict(model.named_parameters())
        for g in self.groups:
            if g.targets is not None and g.targets.numel() == 0:
                continue
            select = None
            if g.targets is not None:
                select = torch.zeros(g.channels, dtype=torch.bool)
                select[g.targets] = True
            if self.cfg.weight > 0:
                norms = channel_norms(model, g).cpu()
                tau = self.cfg.weight * frac * g.scale
                factor = (1.0 - tau / norms.clamp_min(1e-12)).clamp_min(0.0)
                if select is not None:
                    factor = torch.where(select, factor, torch.ones_like(factor))
                for s in g.slices:
                    self._scale(params[s.name], s, factor)
            if self.cfg.norm_weight > 0 and g.gamma_scale > 0:
                tau = self.cfg.norm_weight * frac * g.gamma_scale
                for s in g.slices:
                    if s.norm:
                        self._threshold(params[s.name], s, tau, select)

    @staticmethod
    def _scale(p: torch.Tensor, s: _Slice, factor: torch.Tensor) -> None:
        shape = [1] * p.ndim
        shape[s.dim] = len(s.idxs)
        f = factor.to(p.device, p.dtype)[s.root.to(p.device)].view(shape)
        idx = s.idxs.to(p.device)
        p.index_copy_(s.dim, idx, p.index_select(s.dim, idx) * f)

    @staticmethod
    def _threshold(p: torch.Tensor, s: _Slice, tau: float, select: torch.Tensor | None) -> None:
        idx = s.idxs.to(p.device)
        v = p.index_select(0, idx)
        shrunk = v.sign() * (v.abs() - tau).clamp_min(0.0)
        if select is not None:
            shrunk = torch.where(select.to(p.device)[s.root.to(p.device)], shrunk, v)
        p.index_copy_(0, idx, shrunk)

    def state_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "start_penalty": self.start_penalty,
            "groups": [{"root": g.root, "scale": g.scale, "gamma_scale": g.gamma_scale,
                        "targets": None if g.targets is None else [int(x) for x in g.targets]} for g in self.groups],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state)


__all__ = ["SparsityHook", "channel_norms", "coupled_groups", "group_lasso", "growing_fraction"]
