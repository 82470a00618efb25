"""Recovery without retraining: after a cut, make the pruned model reproduce the dense one.

Two steps, no gradient, a few calibration batches (``(images, targets)`` batches as
:func:`surgery.pruning.calibrate.calibration_data` yields them; only the images are used):

1. **Least-squares re-fit** (He et al., ICCV 2017 "Channel Pruning"; Luo et al., ThiNet). For
   each conv/linear layer whose input channels were cut, in forward order, solve::

       min_W ||W X' - Y||^2 + lam ||W - W0||^2

   ``X'``: the *pruned* model's input to the layer (im2col patches at sampled positions), after
   every earlier layer was already re-fit, so each layer corrects the error accumulated upstream;
   ``Y``: the *dense* model's output of the same layer (pre-norm) on the same images, restricted
   to the output channels the cut kept; ``W0``: the layer's current (cut) weights. The ridge term
   pulls towards ``W0`` rather than towards zero: deep layers of a small input see few spatial
   positions (a 4x4 map) and their systems are under-determined, where a plain ridge would shrink
   the filters. The bias is fitted too when the layer has one. A fit that does not lower the
   error on the calibration samples is not applied. Layers of the dense and pruned models are
   matched by module name (a cut keeps names).
2. **BatchNorm re-estimation**: running statistics reset and re-accumulated (cumulative average,
   ``momentum=None``) in a no-grad forward with only the BatchNorm layers in train mode.

Frozen norms: ``FrozenBatchNorm2d`` (torchvision's R-CNN/RetinaNet/FCOS ResNet backbones) keeps its
statistics as buffers of a fixed layer; re-estimating them would change what the layer is. They are
left as they are: step 1 fits the conv *before* such a norm to the dense model's pre-norm output,
so the frozen (dense) statistics are again the right ones for it; that is where the correction is
folded. GroupNorm has no running statistics (nothing to re-estimate).

Not re-fit (named in the result with the reason): grouped and depthwise convs (each output sees
only its own group's inputs, and a cut removes a channel's input and output together, so the layer
itself has no mismatch to fix; the BatchNorm after it is re-estimated), transposed convs, convs with
a non-zero padding mode or string padding, and layers whose weights are constants
(``model.fixed_weights()``: YOLOv8's DFL). Linear layers are re-fit like 1x1 convs.

Two-stage detectors pick RoIs from the data: while a layer is re-fit the pruned model's RPN is made
to return the dense model's proposals, so box-head layers compare the same regions.

Cost: each layer's fit runs the calibration batches through the pruned model up to that layer.
The outputs of modules that no later fit can change (the backbone, once the head's layers are
being fitted) are kept and replayed rather than recomputed (:class:`_Replay`, at most
``REPLAY_BYTES``): the same weights in 1.7x (FCOS, RetinaNet at 128 px) to 4-5.5x (Faster R-CNN,
SSDlite at 320 px) less time (``benchmarks/recovery_speed.py``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PruningError
from .budget import Recovery

DEFAULT_POSITIONS = 1024  # sampled spatial positions per layer call and batch
DEFAULT_RIDGE = 1e-2  # lam = ridge x mean diagonal of X'^T X'
HOLD_EVERY = 4  # with recover(ridges=...): every fourth calibration batch scores each layer's candidate ridges
RECOVER_BATCH_SIZE = 8  # images per calibration batch for recovery
DEFAULT_RECOVER_BATCHES = Recovery.batches  # calibration batches (why 16: the comment at Recovery)


@dataclass
class LayerFit:
    """One layer's least-squares re-fit. Errors are relative, ``||W X' - Y||^2 / ||Y||^2`` on the
    calibration samples, with the cut weights (before) and the fitted ones (after)."""

    name: str
    kind: str  # conv | linear
    samples: int
    unknowns: int
    error_before: float
    error_after: float
    refit: bool  # False: the fit did not lower the error, the weights were kept
    ridge: float | None = None  # the ridge used (chosen by held-out error when recover() had ``ridges``)


@dataclass
class RecoveryResult:
    layers: list[LayerFit]
    skipped: dict[str, str]  # layer -> why it was not re-fit
    bn_reestimated: list[str]
    frozen_norms: list[str]  # FrozenBatchNorm2d layers left as they are (see the module docstring)
    batches: int
    images: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def refit(self) -> list[str]:
        return [f.name for f in self.layers if f.refit]

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (what a checkpoint's metrics record)."""
        return {"layers_refit": len(self.refit), "bn_reestimated": len(self.bn_reestimated),
                "batches": self.batches, "images": self.images, "seconds": round(self.seconds, 2),
                "mean_error_before": _mean([f.error_before for f in self.layers]),
                "mean_error_after": _mean([min(f.error_after, f.error_before) for f in self.layers])}


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 5) if xs else None


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer being fitted was seen."""


# --------------------------------------------------------------------------------------------
# which layers


def _why_not(layer: nn.Module) -> str | None:
    if isinstance(layer, nn.Linear):
        return None
    if not isinstance(layer, nn.Conv2d):
        return "transposed or non-2d conv: not supported by the re-fit" if isinstance(
            layer, nn.modules.conv._ConvNd) else "not a conv/linear layer"
    if layer.groups != 1:
        return "grouped/depthwise conv: a cut removes each channel's input and output together (its BatchNorm is re-estimated)"
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return "padding mode/string padding: patches not extracted"
    return None


def _in_width(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def select_layers(pruned: nn.Module, dense: nn.Module, *, scope: str = "consumers") -> tuple[list[str], dict[str, str]]:
    """Layers to re-fit (``consumers``: those whose input channels were cut; ``all``: every
    supported layer) and the reason each other candidate is skipped."""
    if scope not in ("consumers", "all"):
        raise PruningError(f"recovery scope must be 'consumers' or 'all', not {scope!r}")
    dense_mods = dict(dense.named_modules())
    fixed = set(pruned.fixed_weights()) if callable(getattr(pruned, "fixed_weights", None)) else set()
    chosen, skipped = [], {}
    for name, layer in pruned.named_modules():
        if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        ref = dense_mods.get(name)
        if ref is None or type(ref) is not type(layer):
            skipped[name] = "no layer of that name and type in the dense model"
            continue
        cut_input = _in_width(layer) != _in_width(ref)
        if scope == "consumers" and not cut_input:
            continue
        if name in fixed:
            skipped[name] = "constant weights (fixed_weights)"
            continue
        why = _why_not(layer)
        if why is not None:
            if cut_input:
                skipped[name] = why
            continue
        chosen.append(name)
    return chosen, skipped


# --------------------------------------------------------------------------------------------
# capture


def _images(batch: Any, device: torch.device) -> list[torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], (list, tuple)) and \
            batch[1] and isinstance(batch[1][0], dict):
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        batch = list(batch)
    if not isinstance(batch, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in batch):
        raise PruningError("recovery data must yield (images, targets) batches or lists of image tensors")
    return [t.to(device) for t in batch]


def _calibration_images(model: nn.Module, data: Iterable[Any], batches: int) -> list[list[torch.Tensor]]:
    """The first ``batches`` batches of ``data`` as lists of image tensors on ``model``'s device
    (the targets of ``(images, targets)`` batches dropped); one error when there is none."""
    device = next(model.parameters()).device
    imgs = [_images(b, device) for b in itertools.islice(iter(data), batches)]
    if not imgs:
        raise PruningError("the recovery data yielded no batch")
    return imgs


@contextlib.contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, t in modes:
            m.train(t)


def _rows(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Output ``[B, C, H, W]`` (conv) or ``[..., C]`` (linear) as ``[positions, C]``."""
    if isinstance(layer, nn.Linear):
        return t.reshape(-1, t.shape[-1])
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _patches(x: torch.Tensor, layer: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """The layer's input at output positions ``idx`` (flat over batch and space): ``[n, d]``."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])[idx]
    b = x.shape[0]
    out = []
    per = None
    for i in range(b):  # one image at a time bounds the im2col memory
        cols = F.unfold(x[i : i + 1], layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)[0]  # [d, L]
        per = cols.shape[1]
        sel = idx[(idx >= i * per) & (idx < (i + 1) * per)] - i * per
        out.append(cols[:, sel].T)
    return torch.cat(out) if out else x.new_zeros(0, 0)


def _sample(n: int, k: int, seed: int) -> torch.Tensor:
    if n <= k:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


def _proposals_module(model: nn.Module) -> nn.Module | None:
    rpn = getattr(model, "rpn", None)
    return rpn if isinstance(rpn, nn.Module) else None


def _capture_dense(dense: nn.Module, batches: list[list[torch.Tensor]], layers: list[str], positions: int):
    """Dense outputs of ``layers`` at sampled positions, per (layer, batch, call), and the RPN's
    proposals per batch (two-stage models)."""
    mods = dict(dense.named_modules())
    targets: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    proposals: dict[int, Any] = {}
    calls: dict[tuple[str, int], int] = {}
    b_now = [0]

    def hook_for(li: int, name: str):
        def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
            key = (name, b_now[0])
            c = calls.get(key, 0)
            calls[key] = c + 1
            rows = _rows(out.detach(), m)
            idx = _sample(rows.shape[0], positions, seed=1_000_003 * b_now[0] + 7919 * c + li)
            targets[(name, b_now[0], c)] = (idx, rows[idx].float())
        return hook

    handles = [mods[n].register_forward_hook(hook_for(i, n)) for i, n in enumerate(layers)]
    rpn = _proposals_module(dense)
    if rpn is not None:
        handles.append(rpn.register_forward_hook(lambda m, i, o: proposals.__setitem__(b_now[0], o)))
    with _hooks(handles), torch.no_grad():
        for b, images in enumerate(batches):
            b_now[0] = b
            dense(images)
    return targets, proposals, calls


# --------------------------------------------------------------------------------------------
# replaying what no later fit can change


REPLAY_BYTES = 1 << 30  # at most this much memory for replayed outputs (0: recompute everything)


class _Uncacheable(Exception):
    """An output this module cannot copy (not tensors in tuples, lists and dicts)."""


def _copy_out(out: Any) -> Any:
    """A detached copy of a module's output: tensors in (named) tuples, lists and dicts."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, dict):
        return type(out)((k, _copy_out(v)) for k, v in out.items())
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_copy_out(v) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_copy_out(v) for v in out)
    if out is None or isinstance(out, (int, float, bool, str)):
        return out
    if hasattr(out, "__dict__") and not isinstance(out, nn.Module):  # torchvision's ImageList: tensors and sizes
        new = copy.copy(out)
        for k, v in vars(out).items():
            setattr(new, k, _copy_out(v))
        return new
    raise _Uncacheable


def _nbytes(out: Any) -> int:
    if isinstance(out, torch.Tensor):
        return out.element_size() * out.nelement()
    if isinstance(out, dict):
        return sum(_nbytes(v) for v in out.values())
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(v) for v in out)
    if hasattr(out, "__dict__"):
        return sum(_nbytes(v) for v in vars(out).values())
    return 0


class _Replay:
    """Outputs of *finished* modules of the pruned model, kept per (batch, call) and replayed
    instead of recomputed while later layers are re-fit.

    Why: the re-fit runs the calibration batches through the pruned model once per layer, up to
    that layer; a detector's head layers sit at the end, so every one of them re-ran the whole
    backbone on every batch although nothing in it could change any more, and the recovery's cost
    grew with layers x depth (112 of a 118 s compress trial on the quickstart FCOS). A module is
    finished for the layer being fitted when every call of it ends before that layer's first call
    starts: its inputs are final, and so are its weights, since the layers still to fit are fitted in
    forward order and all start later; its outputs are then the same on every later pass (eval
    mode, no gradient). Only the outermost finished modules replay; a miss (a batch not yet seen)
    computes and stores. Replayed outputs are copies, so an in-place op downstream cannot change what is kept. Memory is bounded by
    ``max_bytes``; past it, outputs are recomputed as before. Results are the same as without."""

    def __init__(self, model: nn.Module, images: list[torch.Tensor], order: list[str], max_bytes: int) -> None:
        """``order``: the layers to fit, in the order of their first call (:func:`_forward_order`)."""
        self.max_bytes, self.used, self.batch = max_bytes, 0, 0
        self.mods = {n: m for n, m in model.named_modules() if n}
        self.start: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.order = order
        self.active: dict[str, dict[tuple[int, int], Any]] = {}
        self.calls: dict[str, int] = {}
        self.refused: set[str] = set()
        self.saved: dict[str, Any] = {}
        if max_bytes > 0:
            self._time_calls(model, images)

    def _time_calls(self, model: nn.Module, images: list[torch.Tensor]) -> None:
        """When each module's first call starts and last call ends, in one forward."""
        clock = itertools.count()

        def started(name: str) -> None:
            self.start.setdefault(name, next(clock))

        def ended(name: str) -> None:
            self.end[name] = next(clock)

        handles = []
        for n, m in self.mods.items():  # hooks that return None: nothing replaced
            handles.append(m.register_forward_pre_hook(lambda m, i, n=n: started(n)))
            handles.append(m.register_forward_hook(lambda m, i, o, n=n: ended(n)))
        with _hooks(handles), torch.no_grad():
            model(images)

    def _finished(self, name: str, first_start: int) -> bool:
        m = self.mods[name]
        if name not in self.end or self.end[name] >= first_start or name in self.refused:
            return False
        return not (m._forward_hooks or m._forward_pre_hooks)  # another hook (the RPN's proposals) decides its output

    def prepare(self, li: int) -> None:
        """Before fitting ``order[li]``: replay the outermost modules finished for it."""
        if self.max_bytes <= 0:
            return
        first = self.start.get(self.order[li], -1)
        done = {n for n in self.mods if self._finished(n, first)}
        outer = {n for n in done if not any(n.startswith(p + ".") for p in done)}
        for n in list(self.active):
            if n not in outer and any(n.startswith(p + ".") and p in self.active for p in outer):
                self._drop(n)
        for n in outer - set(self.active):
            self._install(n)

    def begin(self, batch: int) -> None:
        self.batch = batch
        self.calls = dict.fromkeys(self.active, 0)

    def _install(self, name: str) -> None:
        m, store = self.mods[name], {}
        self.active[name] = store
        self.saved[name] = m.__dict__.get("forward")
        forward = m.forward

        def replay(*args: Any, **kwargs: Any) -> Any:
            key = (self.batch, self.calls.get(name, 0))
            self.calls[name] = key[1] + 1
            if key in store:
                return _copy_out(store[key])
            out = forward(*args, **kwargs)
            if name not in self.refused:
                try:
                    kept = _copy_out(out)
                except _Uncacheable:
                    self.refused.add(name)
                    return out
                size = _nbytes(kept)
                if self.used + size <= self.max_bytes:
                    store[key] = kept
                    self.used += size
            return out

        m.forward = replay

    def _drop(self, name: str) -> None:
        m, saved = self.mods[name], self.saved.pop(name)
        if saved is None:
            del m.forward
        else:
            m.forward = saved
        self.used -= sum(_nbytes(v) for v in self.active.pop(name).values())

    def close(self) -> None:
        for n in list(self.active):
            self._drop(n)


# --------------------------------------------------------------------------------------------
# least squares


def _solve(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_W ||X W^T - Y||^2 + lam ||W - W0||^2`` from the moments ``X^T X``, ``X^T Y``
    (``lam = ridge x`` the mean diagonal of ``X^T X``)."""
    d = gram.shape[0]
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    rhs = cross + lam * w0.T
    system = gram + lam * torch.eye(d, dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(system)  # symmetric positive definite when lam > 0: half LU's work
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor).T  # [o, d]
    try:
        return torch.linalg.solve(system, rhs).T
    except RuntimeError:
        return torch.linalg.lstsq(system, rhs).solution.T


def _held_batch(b: int, batches: int) -> bool:
    """Whether calibration batch ``b`` is held out of a layer's fit to choose its ridge: every
    fourth batch (none when there are fewer than two)."""
    return batches >= 2 and b % HOLD_EVERY == HOLD_EVERY - 1


def _fit_layer(pruned: nn.Module, name: str, li: int, batches: list[list[torch.Tensor]], targets, proposals, calls,
               kept: Sequence[int] | None, ridge: float, replay: _Replay,
               ridges: Sequence[float] | None = None) -> LayerFit:
    layer = dict(pruned.named_modules())[name]
    has_bias = layer.bias is not None
    w0 = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()  # [o, d]
    if has_bias:
        w0 = torch.cat([w0, layer.bias.detach().double()[:, None]], 1)
    d, o = w0.shape[1], w0.shape[0]
    gram = torch.zeros(d, d, dtype=torch.float64)
    cross = torch.zeros(d, o, dtype=torch.float64)
    yy, n = 0.0, 0
    # with ``ridges``: the moments of the held-out batches apart (those of the fit are the totals minus them)
    select = bool(ridges) and any(_held_batch(b, len(batches)) for b in range(len(batches)))
    gram_h = torch.zeros(d, d, dtype=torch.float64) if select else None
    cross_h = torch.zeros(d, o, dtype=torch.float64) if select else None
    yy_h = 0.0
    b_now = [0]
    seen: dict[int, int] = {}
    keep = torch.as_tensor(list(kept), dtype=torch.long) if kept is not None else None

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        nonlocal yy, n, yy_h
        b = b_now[0]
        c = seen.get(b, 0)
        seen[b] = c + 1
        idx, y = targets[(name, b, c)]
        x = _patches(inp[0].detach(), m, idx).float()
        if has_bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        if keep is not None:
            y = y[:, keep]
        if y.shape[1] != o or x.shape[0] != y.shape[0]:
            raise PruningError(f"recovery: {name} output {tuple(y.shape)} does not match the pruned layer ({x.shape[0]}, {o})")
        # one batch's products in float32 (relative error ~3e-7, far below the ridge), summed over
        # batches in float64 by an in-place add: the float64 products were 4 to 6 times slower
        xx, xy, y2 = x.T @ x, x.T @ y, float((y.double() * y.double()).sum())
        gram.add_(xx)
        cross.add_(xy)
        yy += y2
        n += x.shape[0]
        if gram_h is not None and cross_h is not None and _held_batch(b, len(batches)):
            gram_h.add_(xx)
            cross_h.add_(xy)
            yy_h += y2
        if seen[b] == calls.get((name, b), 0):
            raise _Stop

    handles = [layer.register_forward_hook(hook)]
    rpn = _proposals_module(pruned)
    if rpn is not None and proposals:
        handles.append(rpn.register_forward_hook(lambda m, i, o: proposals[b_now[0]]))
    with _hooks(handles), torch.no_grad():
        for b, images in enumerate(batches):
            if calls.get((name, b), 0) == 0:
                continue
            b_now[0] = b
            replay.begin(b)
            try:
                pruned(images)
            except _Stop:
                pass
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    if n == 0:
        return LayerFit(name, kind, 0, d, float("nan"), float("nan"), False)

    def err(w: torch.Tensor, g: torch.Tensor = gram, c: torch.Tensor = cross, y2: float = yy) -> float:
        return float((w * (w @ g)).sum() - 2 * (w * c.T).sum() + y2)  # ||X w^T - Y||^2 from the moments

    chosen: float | None = ridge
    if select and gram_h is not None and cross_h is not None and yy_h > 0:
        # each candidate fitted without the held-out batches and scored on them; the cut weights
        # (an infinite ridge) are a candidate too: a layer whose fit does not generalise keeps them
        g_fit, c_fit = gram - gram_h, cross - cross_h
        scores = {r: err(_solve(g_fit, c_fit, w0, r), gram_h, cross_h, yy_h) for r in ridges or ()}
        best = min(scores, key=lambda r: scores[r])
        chosen = best if scores[best] < err(w0, gram_h, cross_h, yy_h) else None
    w = _solve(gram, cross, w0, chosen) if chosen is not None else w0
    scale = max(yy, 1e-12)
    before, after = err(w0) / scale, err(w) / scale
    ok = chosen is not None and bool(torch.isfinite(w).all()) and after < before
    if ok:
        with torch.no_grad():
            wt = w[:, : d - 1] if has_bias else w
            layer.weight.copy_(wt.reshape(layer.weight.shape).to(layer.weight.dtype))
            if has_bias:
                layer.bias.copy_(w[:, -1].to(layer.bias.dtype))
    return LayerFit(name, kind, n, d, before, after, ok, chosen)


def _forward_order(model: nn.Module, names: list[str], images: list[torch.Tensor]) -> list[str]:
    mods = dict(model.named_modules())
    order: list[str] = []
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: order.append(n) if n not in order else None)
               for n in names]
    with _hooks(handles), torch.no_grad():
        model(images)
    return order


# --------------------------------------------------------------------------------------------
# BatchNorm


def reestimate_batchnorm(model: nn.Module, batches: Iterable[list[torch.Tensor]]) -> list[str]:
    """Reset every BatchNorm's running statistics and re-accumulate them (cumulative average) over
    ``batches`` with no gradient; every other layer stays in eval mode. Returns the layers."""
    bns = [(n, m) for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return []
    momenta = {m: m.momentum for _, m in bns}
    with _eval_mode(model):
        try:
            for _, m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            with torch.no_grad():
                for images in batches:
                    model(images)
        finally:
            for m, mom in momenta.items():
                m.momentum = mom
    return [n for n, _ in bns]


def frozen_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == "FrozenBatchNorm2d"]


# --------------------------------------------------------------------------------------------
# the step


def recover(
    pruned: nn.Module,
    dense: nn.Module,
    data: Iterable[Any],
    *,
    kept: dict[str, Sequence[int]] | None = None,
    batches: int = DEFAULT_RECOVER_BATCHES,
    positions: int = DEFAULT_POSITIONS,
    ridge: float = DEFAULT_RIDGE,
    ridges: Sequence[float] | None = None,
    scope: str = "consumers",
    refit: bool = True,
    batchnorm: bool = True,
    replay_bytes: int = REPLAY_BYTES,
) -> RecoveryResult:
    """Make ``pruned`` (cut from ``dense``, in place) reproduce ``dense`` on the first ``batches``
    batches of ``data``: least-squares re-fit of the cut layers' consumers in forward order, then
    BatchNorm re-estimation (see the module docstring). ``kept``: for layers whose outputs were
    cut, the dense output channels kept (:attr:`surgery.pruning.prune.PruneResult.kept`); a layer whose
    outputs were cut but is not in ``kept`` is skipped. No gradient step; ``dense`` is unchanged."""
    if batches < 1:
        raise PruningError("recovery needs at least one calibration batch")
    if ridge < 0 or positions < 1 or any(not r >= 0 for r in ridges or ()):
        raise PruningError("recovery: ridge must be >= 0 and positions >= 1")
    t0 = time.perf_counter()
    kept = dict(kept or {})
    imgs = _calibration_images(pruned, data, batches)
    fits: list[LayerFit] = []
    skipped: dict[str, str] = {}
    with _eval_mode(pruned, dense):
        if refit:
            names, skipped = select_layers(pruned, dense, scope=scope)
            dense_mods, pruned_mods = dict(dense.named_modules()), dict(pruned.named_modules())
            usable = []
            for n in names:
                out_p = _out_width(pruned_mods[n])
                if out_p != _out_width(dense_mods[n]) and n not in kept:
                    skipped[n] = "output channels cut but which ones is unknown (pass kept=PruneResult.kept)"
                    continue
                usable.append(n)
            order = _forward_order(pruned, usable, imgs[0])
            for n in usable:
                if n not in order:
                    skipped[n] = "not reached by an inference forward"
            targets, proposals, calls = _capture_dense(dense, imgs, order, positions)
            replay = _Replay(pruned, imgs[0], order, replay_bytes)
            try:
                for li, n in enumerate(order):
                    replay.prepare(li)
                    fits.append(_fit_layer(pruned, n, li, imgs, targets, proposals, calls, kept.get(n), ridge, replay,
                                           ridges))
                    for key in [k for k in targets if k[0] == n]:
                        del targets[key]  # free what this layer used
            finally:
                replay.close()
    bn = reestimate_batchnorm(pruned, imgs) if batchnorm else []
    return RecoveryResult(layers=fits, skipped=skipped, bn_reestimated=bn, frozen_norms=frozen_norms(pruned),
                          batches=len(imgs), images=sum(len(b) for b in imgs), seconds=time.perf_counter() - t0)


__all__ = ["DEFAULT_RECOVER_BATCHES", "RECOVER_BATCH_SIZE", "LayerFit", "RecoveryResult", "frozen_norms", "recover",
           "reestimate_batchnorm", "select_layers"]
