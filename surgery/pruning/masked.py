"""Masked (unstructured) magnitude pruning: the baseline that physical channel cuts are compared with.

Han et al. (2015) zero the weights of smallest magnitude; Zhu & Gupta (2017) raise the sparsity
gradually during training (automated gradual pruning, AGP, as in Distiller). Only the weights of
convolutions, transposed convolutions and linear layers are pruned, never biases or norm layers.

Masks are ``{parameter name: bool tensor}`` (``True`` = kept). They are *folded* into the weights
(:func:`fold_masks` zeroes the pruned entries in place), so a masked model is a plain model with
zeros and no hooks; the masks are kept only as data, to re-apply after every optimizer step while
retraining and to record in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import compat
from ..errors import PruningError

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
SCOPES = ("layer", "global")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or the model)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def prunable_parameters(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
    """``{name: weight}`` of every conv / transposed conv / linear weight (or only ``names``).

    Names are the model's ``state_dict`` names (a DDP wrapper is looked through).
    """
    model = unwrap(model)
    # layers whose weights are constants, not learned (a model may name them: YOLOv8's DFL conv
    # holds 0..reg_max-1 to turn distributions into distances; zeroing its small values destroys every box)
    fixed = set(getattr(model, "fixed_weights", lambda: ())())
    found: dict[str, nn.Parameter] = {}
    for mname, module in model.named_modules():
        if mname in fixed:
            continue
        if isinstance(module, PRUNABLE_TYPES) and isinstance(module.weight, nn.Parameter):
            found[f"{mname}.weight" if mname else "weight"] = module.weight
    if names is None:
        return found
    wanted = list(names)
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise PruningError(
            f"cannot mask {unknown[:3]}{' ...' if len(unknown) > 3 else ''}: not the weight of a "
            "Conv/ConvTranspose/Linear layer of this model"
        )
    return {n: found[n] for n in wanted}


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a sparsity prunes: ``round(sparsity * numel)`` (half up)."""
    return min(numel, max(0, math.floor(sparsity * numel + 0.5)))


def _check_sparsity(sparsity: float, scope: str) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise PruningError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise PruningError(f"scope must be 'layer' or 'global', got {scope!r}")


def _mask_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask over ``scores`` (flat) with exactly the ``k`` smallest set to False.

    Linear time (``kthvalue``); ties at the threshold are pruned in order of position, so the
    count is exact and the result deterministic.
    """
    n = scores.numel()
    if k <= 0:
        return torch.ones(n, dtype=torch.bool, device=scores.device)
    if k >= n:
        return torch.zeros(n, dtype=torch.bool, device=scores.device)
    threshold = torch.kthvalue(scores, k).values
    mask = scores > threshold  # ties at the threshold start pruned
    need = k - int((scores < threshold).sum())  # how many of the ties must stay pruned
    ties = torch.nonzero(scores == threshold).flatten()
    mask[ties[need:]] = True
    return mask


@torch.no_grad()
def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    scope: str = "layer",
    names: list[str] | None = None,
    *,
    previous: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """L1-magnitude masks pruning ``sparsity`` of the weights (``True`` = kept).

    ``scope="layer"`` prunes every layer to ``sparsity`` (``round(sparsity * numel)`` weights each);
    ``scope="global"`` ranks all weights together under one threshold (``round(sparsity * total)``
    pruned in all). Counts are exact: ties are broken by position.

    ``previous`` masks are never un-pruned: their pruned weights rank first, and a layer (or, for
    the global scope, the model) never ends up with fewer pruned weights than before.

    Under ``torch.distributed`` the masks of rank 0 are broadcast, so every rank holds the same.
    Masks live on the device of their weights.
    """
    _check_sparsity(sparsity, scope)
    params = prunable_parameters(model, names)
    if not params:
        raise PruningError("the model has no Conv/ConvTranspose/Linear weight to mask")
    previous = previous or {}

    def scores(name: str, p: torch.Tensor) -> torch.Tensor:
        s = p.detach().abs().flatten().float()
        prev = previous.get(name)
        if prev is not None:
            s = s.masked_fill(~prev.to(s.device, torch.bool).flatten(), -1.0)  # pruned rank first
        return s

    def prev_pruned(name: str) -> int:
        prev = previous.get(name)
        return 0 if prev is None else int((~prev.bool()).sum())

    masks: dict[str, torch.Tensor] = {}
    if scope == "layer":
        for name, p in params.items():
            k = max(pruned_count(p.numel(), sparsity), prev_pruned(name))
            masks[name] = _mask_smallest(scores(name, p), k).view_as(p)
    else:
        flat = [scores(name, p).cpu() for name, p in params.items()]
        allscores = torch.cat(flat)
        k = max(pruned_count(allscores.numel(), sparsity), sum(prev_pruned(n) for n in params))
        allmask = _mask_smallest(allscores, k)
        for (name, p), piece in zip(params.items(), torch.split(allmask, [f.numel() for f in flat]), strict=True):
            masks[name] = piece.view_as(p).to(p.device)
    return broadcast_masks(masks)


def broadcast_masks(masks: dict[str, torch.Tensor], src: int = 0) -> dict[str, torch.Tensor]:
    """Make every rank hold rank ``src``'s masks (a no-op outside ``torch.distributed``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not masks:
        return masks
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    names = sorted(masks)
    flat = torch.cat([masks[n].flatten().to(device, torch.uint8) for n in names])
    dist.broadcast(flat, src=src)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for n in names:
        m = masks[n]
        out[n] = flat[offset : offset + m.numel()].view(m.shape).to(m.device, torch.bool)
        offset += m.numel()
    return {n: out[n] for n in masks}


@torch.no_grad()
def fold_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Fold masks into the weights: zero the pruned weights in place (exactly ``0.0``). In place;
    returns ``model``. The one mask-folding function: the trainer re-applies masks with it after
    every optimizer step (as :func:`apply_masks`), bench and export fold a masked checkpoint's masks.

    Any ``torch.nn.utils.prune`` re-parametrisation (``weight_orig`` x ``weight_mask`` forward
    pre-hooks) is first turned back into a plain weight, so a masked model is timed and exported
    exactly like a dense one of the same shape (no hook overhead in its favour or against it).
    ``masks`` (``{param_name: bool tensor}``, ``True`` = kept) must name Conv/ConvTranspose/Linear
    weights of the same shapes.
    """
    compat.remove_prune_reparametrizations(unwrap(model))
    params = prunable_parameters(model, list(masks or {}))
    for name, p in params.items():
        m = masks[name]
        if m.shape != p.shape:
            raise PruningError(f"mask for {name} has shape {tuple(m.shape)}, the weight {tuple(p.shape)}")
        if m.device != p.device:
            m = m.to(p.device)
        p.masked_fill_(~m.bool(), 0.0)
    return model


apply_masks = fold_masks  # the trainer's name for it


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the gradients of pruned weights (keeps optimizer state and gradient norms clean)."""
    params = prunable_parameters(model, list(masks))
    for name, p in params.items():
        if p.grad is not None:
            m = masks[name]
            p.grad.masked_fill_(~(m if m.device == p.device else m.to(p.device)).bool(), 0.0)


def masks_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of masked-out entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return 0.0 if total == 0 else sum(int((~m.bool()).sum()) for m in masks.values()) / total


# --------------------------------------------------------------------------------------------
# reports


@dataclass
class LayerSparsity:
    name: str
    params: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


@dataclass
class SparsityReport:
    """Zeros per prunable layer, and over the prunable weights and over all parameters."""

    layers: list[LayerSparsity]
    total_params: int  # every parameter of the model
    total_zeros: int
    prunable_params: int  # Conv/ConvTranspose/Linear weights
    prunable_zeros: int

    @property
    def nonzeros(self) -> int:
        return self.total_params - self.total_zeros

    @property
    def sparsity(self) -> float:
        """Sparsity of the prunable weights."""
        return self.prunable_zeros / self.prunable_params if self.prunable_params else 0.0

    @property
    def total_sparsity(self) -> float:
        return self.total_zeros / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_params": self.total_params,
            "total_zeros": self.total_zeros,
            "nonzeros": self.nonzeros,
            "prunable_params": self.prunable_params,
            "prunable_zeros": self.prunable_zeros,
            "sparsity": self.sparsity,
            "total_sparsity": self.total_sparsity,
            "layers": {layer.name: {"params": layer.params, "zeros": layer.zeros} for layer in self.layers},
        }


@torch.no_grad()
def sparsity_report(model: nn.Module, names: list[str] | None = None) -> SparsityReport:
    """Count exact zeros per prunable layer and over the whole model."""
    model = unwrap(model)
    layers = [
        LayerSparsity(name, p.numel(), int((p == 0).sum())) for name, p in prunable_parameters(model, names).items()
    ]
    total = sum(p.numel() for p in model.parameters())
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return SparsityReport(
        layers=layers,
        total_params=total,
        total_zeros=zeros,
        prunable_params=sum(layer.params for layer in layers),
        prunable_zeros=sum(layer.zeros for layer in layers),
    )


@dataclass
class MaskedResult:
    """What :func:`prune_masked` did: the masks (already folded into the weights) and the counts."""

    masks: dict[str, torch.Tensor]
    sparsity: float
    scope: str
    before: SparsityReport
    after: SparsityReport
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        return self.after.total_params

    @property
    def nonzeros_before(self) -> int:
        return self.before.nonzeros

    @property
    def nonzeros_after(self) -> int:
        return self.after.nonzeros

    @property
    def layer_sparsity(self) -> dict[str, float]:
        return {layer.name: layer.sparsity for layer in self.after.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for a checkpoint's ``metrics`` or a report)."""
        return {
            "method": "magnitude",
            "sparsity": self.sparsity,
            "scope": self.scope,
            "total_params": self.total_params,
            "nonzeros_before": self.nonzeros_before,
            "nonzeros_after": self.nonzeros_after,
            "layer_sparsity": self.layer_sparsity,
        }


def prune_masked(
    model: nn.Module, sparsity: float, scope: str = "layer", names: list[str] | None = None
) -> MaskedResult:
    """Magnitude-prune ``model`` in place: compute the masks and fold them into the weights.

    Save the result with ``save_checkpoint(..., kind="masked", masks=result.masks)``.
    """
    before = sparsity_report(model, names)
    masks = magnitude_masks(model, sparsity, scope, names)
    apply_masks(model, masks)
    return MaskedResult(masks=masks, sparsity=sparsity, scope=scope, before=before, after=sparsity_report(model, names))


# --------------------------------------------------------------------------------------------
# automated gradual pruning


@dataclass
class AGPSchedule:
    """Zhu & Gupta's cubic schedule.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))**3`` for ``t0 <= t <= t_end``,
    ``s_i`` before ``t0`` and ``s_f`` after ``t_end``. Masks are recomputed every ``frequency``
    steps from ``t0`` and at ``t_end`` (so the final sparsity is always reached there).
    """

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.8
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity < 1.0:
            raise PruningError(
                f"AGP needs 0 <= initial_sparsity <= final_sparsity < 1, got {self.initial_sparsity}, "
                f"{self.final_sparsity}"
            )
        if not 0 <= self.start_step < self.end_step:
            raise PruningError(f"AGP needs 0 <= start_step < end_step, got {self.start_step}, {self.end_step}")
        if self.frequency < 1:
            raise PruningError(f"AGP frequency must be >= 1, got {self.frequency}")

    @classmethod
    def from_section(cls, section: Any) -> AGPSchedule:
        """Build from a recipe :class:`~surgery.config.recipe.AGPSection`."""
        return cls(
            initial_sparsity=section.initial_sparsity,
            final_sparsity=section.final_sparsity,
            start_step=section.start_step,
            end_step=section.end_step,
            frequency=section.frequency,
        )

    def sparsity_at(self, step: int) -> float:
        if step <= self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - frac) ** 3

    def should_update(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.start_step) % self.frequency == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
        }


def matched_sparsity(model: nn.Module, params_target: int) -> float:
    """Masked-pruning sparsity whose non-zero count equals ``params_target`` (conv and linear
    weights are masked; biases and norms stay)."""
    total = sum(p.numel() for p in model.parameters())
    maskable = sum(p.numel() for p in prunable_parameters(model).values())
    s = (total - params_target) / max(1, maskable)
    return float(min(0.99, max(0.01, round(s, 3))))


