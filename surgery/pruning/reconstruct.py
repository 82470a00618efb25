"""Label-free recovery: make a pruned detector reproduce its dense teacher from images alone.

Recovery by reconstruction (the ``reconstruct`` recovery method, ``prune.recover_method``):

1. the least-squares re-fit + BatchNorm re-estimation of :func:`surgery.pruning.recover.recover`;
2. then gradient steps (``torch.optim.Adam``, every trainable weight of the pruned model at once)
   that lower the pruned model's error against the dense model on the calibration images, at the
   layers where the two models can be compared channel for channel:

   - the *boundary* layers: conv/linear layers whose output width the cut kept but whose input
     was cut (the head's output convs: class logits, box regression, centerness, YOLO's box/class
     branches, an R-CNN box predictor; or the first conv of a head tower the cut left whole), so
     every head output the detector post-processes is a function of matched outputs;
   - with ``match="features"`` and ``kept`` (:attr:`surgery.pruning.prune.PruneResult.kept`, known when
     recovery runs right after the cut): also every cut layer, on the dense channels it kept
     (layer-wise reconstruction, as post-training quantization does). A checkpoint does not record
     ``kept``, so ``surgery recover`` matches the boundary layers only.

   The error of a layer (``loss="energy"``, the default) is relative, ``||student - teacher||^2 /
   ||teacher||^2`` summed over the calls of the layer (shared heads run once per pyramid level), and
   the loss is the mean over the layers. ``loss="variance"`` divides each channel's mean squared
   error by the teacher's variance of that channel instead (1 = as far off as predicting the
   channel's mean), floored at ``floor`` x the layer's mean channel variance (and a layer's level
   at a thousandth of its mean energy), so that a near-constant channel -- a background logit, a
   dead unit -- cannot dominate the loss; measured below the energy error on the YOLOs
   (docs/benchmarks/label-free-recovery.md). ``response > 0`` (10, the default) adds, for Ultralytics detectors,
   the head's response distillation terms (:func:`surgery.yolo.response.response_losses`: class-score
   KL, DFL KL weighted by the teacher's confidence). Images only: the data may yield ``(images,
   targets)`` batches, the targets are dropped unread.

   Each step sees one calibration batch, flipped left-right half of the time; with ``augment``
   (the default) each image is replaced by a new view, a random crop (a quarter to all of its area,
   resized back) mixed with another calibration image: the teacher labels any image, so the steps
   match the two models on views the calibration set does not hold (function matching, Beyer et
   al., CVPR 2022) rather than over-fitting its 96 images. The teacher sees the same views.

A held-out part of the calibration batches (``held_out``, at least one batch) is never stepped on:
its error is measured before the re-fit, after it, and every ``eval_every`` steps; the weights with
the lowest held-out error are kept (the re-fit's own when no step helped), and the steps stop after
``patience`` evaluations without a new best, at ``steps``, or once ``seconds`` have passed since the
start (re-fit included) -- whichever comes first. While no step has helped, an evaluation without a
new best (or a non-finite loss) restarts the steps from the re-fit's weights at the learning rate
divided by ``backoff``, at most ``restarts`` times: on YOLO11n no step at 1e-4 lowered the held-out
error, steps at 2e-5 did.

Detectors return losses in train mode and BatchNorm layers update their statistics there, so both
models run in eval mode throughout (with gradients for the student): BatchNorm statistics stay
those the re-fit re-estimated, their affine weights are trained like every other weight. Two-stage
detectors pick RoIs from the data: the student's RPN returns the teacher's proposals for the same
images, so box-head outputs compare the same regions. Layers holding constants
(``model.fixed_weights()``: YOLO's DFL) are not trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PruningError
from ..yolo.response import CLS_GAIN, DFL_GAIN, detect_head, head_outputs, is_ultralytics, response_losses
from .budget import Recovery
from .recover import (
    DEFAULT_RECOVER_BATCHES,
    RecoveryResult,
    _calibration_images,
    _eval_mode,
    _hooks,
    _in_width,
    _out_width,
    _proposals_module,
    recover,
)

DEFAULT_STEPS = Recovery.steps  # optimiser steps after the re-fit (prune.recover_steps)
DEFAULT_SECONDS = Recovery.seconds  # wall-clock budget of the whole recovery, re-fit included (prune.recover_seconds)
DEFAULT_LR = Recovery.lr  # Adam's learning rate (prune.recover_lr)
DEFAULT_HELD_OUT = 0.25  # fraction of the calibration batches kept out of the steps, to decide when to stop
DEFAULT_EVAL_EVERY = 25  # steps between held-out evaluations
DEFAULT_PATIENCE = 4  # evaluations without a new best before stopping
DEFAULT_RESTARTS = 2  # restarts from the re-fit at a smaller learning rate while no step has helped...
DEFAULT_BACKOFF = 5.0  # ...each dividing it by this (1e-4 -> 2e-5 -> 4e-6)
MATCHES = ("outputs", "features")
LOSSES = ("energy", "variance")
DEFAULT_LOSS = "energy"  # measured against "variance" on the 800-step YOLOs: docs/benchmarks/label-free-recovery.md
DEFAULT_FLOOR = 0.1  # a channel's variance counts at least this fraction of its layer's mean channel variance
DEFAULT_AUGMENT = True  # steps on random crops mixed with other calibration images (not only the images themselves)
DEFAULT_RESPONSE = 10.0  # weight of the YOLO head's response terms (class-score KL, DFL KL) added to the error:
# 0 -> 1: YOLOv8n 91.5 -> 93.7% at a 50% cut, 71.2 -> 82.3% at 75%; 1 -> 3 -> 10 (50% / 75% cuts): YOLO11n
# 83.6 -> 88.4 -> 90.7% / 68.3 -> 73.4 -> 75.1%, YOLO26n 69.8 -> 72.9 -> 83.9% / 54.7 -> 57.5 -> 60.2%, YOLOv8n
# 93.7 -> 94.1 -> 94.1% / 82.3 -> 82.2 -> 82.3% (docs/benchmarks/label-free-recovery.md)
ENERGY_LEVEL = 1e-3  # ...and a layer's level is at least this fraction of its mean channel energy


@dataclass
class ReconstructReport:
    """What :func:`reconstruct` did. Errors: mean relative error of the matched layers against the
    teacher on the held-out images (``error_cut``: right after the cut; ``error_refit``: after the
    least-squares re-fit; ``error_best``: the weights kept)."""

    refit: RecoveryResult | None
    layers: list[str]  # the matched layers
    steps: int  # optimiser steps taken
    best_step: int  # the step whose weights were kept (0: the re-fit's)
    stopped: str  # steps | seconds | no improvement
    error_cut: float
    error_refit: float
    error_best: float
    history: list[tuple[int, float]]  # (step, held-out error)
    calibration_images: int
    held_out_images: int
    seconds: float
    lr: float  # the learning rate of the steps whose weights were kept (after any restart)
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): the cost on a machine shared with others
    extra: dict[str, Any] = field(default_factory=dict)

    # what the CLI and checkpoints read from a recovery result (as surgery.pruning.recover.RecoveryResult)
    @property
    def images(self) -> int:
        return self.calibration_images + self.held_out_images

    @property
    def batches(self) -> int:
        return self.refit.batches if self.refit is not None else 0

    @property
    def frozen_norms(self) -> list[str]:
        return self.refit.frozen_norms if self.refit is not None else []

    @property
    def skipped(self) -> dict[str, str]:
        return self.refit.skipped if self.refit is not None else {}

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest (what a checkpoint's metrics record)."""
        base = self.refit.summary() if self.refit is not None else {
            "layers_refit": 0, "bn_reestimated": 0, "mean_error_before": None, "mean_error_after": None}
        return {**base, "method": "reconstruct", "matched_layers": len(self.layers), "steps": self.steps,
                "best_step": self.best_step, "stopped": self.stopped, "held_out_error_cut": round(self.error_cut, 5),
                "held_out_error_refit": round(self.error_refit, 5), "held_out_error_best": round(self.error_best, 5),
                "calibration_images": self.calibration_images, "held_out_images": self.held_out_images,
                "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2), "lr": self.lr}


# --------------------------------------------------------------------------------------------
# which layers


def _fixed(model: nn.Module) -> set[str]:
    return set(model.fixed_weights()) if callable(getattr(model, "fixed_weights", None)) else set()


def matched_layers(pruned: nn.Module, dense: nn.Module, kept: dict[str, Sequence[int]] | None = None, *,
                   match: str = "outputs") -> list[str]:
    """The layers whose outputs are compared with the teacher's (see the module docstring): boundary
    layers (output width kept, input cut), and with ``match="features"`` every layer in ``kept``."""
    if match not in MATCHES:
        raise PruningError(f"reconstruction match must be one of {', '.join(MATCHES)}, not {match!r}")
    dense_mods, fixed, kept = dict(dense.named_modules()), _fixed(pruned), kept or {}
    names = []
    for name, layer in pruned.named_modules():
        ref = dense_mods.get(name)
        if not isinstance(layer, (nn.Conv2d, nn.Linear)) or type(ref) is not type(layer) or name in fixed:
            continue
        same_out = _out_width(layer) == _out_width(ref)
        if same_out and _in_width(layer) != _in_width(ref):
            names.append(name)
        elif match == "features" and not same_out and name in kept:
            names.append(name)
    if not names:
        raise PruningError("reconstruction: no layer of the pruned model can be compared with the teacher's "
                           "(no cut layer feeds a layer whose outputs were kept)")
    return names


# --------------------------------------------------------------------------------------------
# the teacher/student comparison


class _Matcher:
    """Forward hooks on the matched layers of both models: ``teacher(images)`` and
    ``student(images)`` return each layer's outputs (a list, one per call), the teacher's restricted
    to the channels the student kept; the student's RPN returns the teacher's latest proposals."""

    def __init__(self, dense: nn.Module, pruned: nn.Module, layers: list[str], kept: dict[str, Sequence[int]]) -> None:
        self.dense, self.pruned, self.layers = dense, pruned, layers
        self.keep = {n: torch.as_tensor(list(kept[n]), dtype=torch.long) for n in layers if n in kept}
        mods = dict(pruned.named_modules())
        self.dims = {n: -1 if isinstance(mods[n], nn.Linear) else 1 for n in layers}  # the channel dimension
        self.scales: dict[str, torch.Tensor] | None = None  # per-channel normalisers (loss "variance")
        self.response = 0.0  # weight of the YOLO head's response terms (set by reconstruct for Ultralytics models)
        self.outs: dict[str, list[torch.Tensor]] = {}
        self.proposals: Any = None

    def _hook(self, name: str, teacher: bool):
        def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
            if teacher:
                out = out.detach()
                if name in self.keep:
                    out = out.index_select(-1 if isinstance(m, nn.Linear) else 1, self.keep[name].to(out.device))
            self.outs.setdefault(name, []).append(out)
        return hook

    def _run(self, model: nn.Module, images: list[torch.Tensor], teacher: bool) -> dict[str, list[torch.Tensor]]:
        mods = dict(model.named_modules())
        handles = [mods[n].register_forward_hook(self._hook(n, teacher)) for n in self.layers]
        rpn = _proposals_module(model)
        if rpn is not None and teacher:
            handles.append(rpn.register_forward_hook(lambda m, i, o: setattr(self, "proposals", o)))
        elif rpn is not None:
            handles.append(rpn.register_forward_hook(lambda m, i, o: self.proposals))
        head = detect_head(model) if self.response > 0 else None
        if head is not None:
            handles.append(head.register_forward_hook(
                lambda m, i, o: self.outs.__setitem__("__head__", [head_outputs(o, m), int(m.reg_max)])))
        self.outs = {}
        with _hooks(handles):
            model(images)
        outs, self.outs = self.outs, {}
        if teacher and "__head__" in outs:
            (boxes, scores), reg_max = outs["__head__"]
            outs["__head__"] = [(boxes.detach(), scores.detach()), reg_max]
        return outs

    def teacher(self, images: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        with torch.no_grad():
            return self._run(self.dense, images, teacher=True)

    def student(self, images: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        return self._run(self.pruned, images, teacher=False)

    def error(self, student: dict[str, Any], teacher: dict[str, Any]) -> torch.Tensor:
        err = _error(student, teacher, self.scales, self.dims)
        if self.response > 0 and "__head__" in teacher and "__head__" in student:
            (sb, ss), reg_max = student["__head__"]
            (tb, ts), _ = teacher["__head__"]
            cls, dfl = response_losses(sb, ss, tb, ts, reg_max)
            err = err + self.response * (CLS_GAIN * cls + (DFL_GAIN * dfl if reg_max > 1 else 0.0))
        return err


def _channel_dim(out: torch.Tensor, linear: bool) -> int:
    return out.dim() - 1 if linear else 1


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` as ``[positions, channels]`` (channels: dimension ``dim``)."""
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


def channel_scales(outs: Iterable[dict[str, list[torch.Tensor]]], dims: dict[str, int], floor: float) -> dict[str, torch.Tensor]:
    """Per layer, per channel: the teacher's variance over every position, call and batch of ``outs``,
    floored at ``floor`` x the layer's mean channel variance (a near-constant channel -- a background
    logit, a dead unit -- would otherwise divide its error by ~0 and dominate the loss)."""
    acc: dict[str, list[torch.Tensor | int]] = {}
    for batch in outs:
        for name, calls in batch.items():
            if name not in dims:
                continue
            for t in calls:
                x = _per_channel(t.detach().double(), dims[name])
                a = acc.setdefault(name, [x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1]), 0])
                a[0] = a[0] + x.sum(0)
                a[1] = a[1] + (x * x).sum(0)
                a[2] = int(a[2]) + x.shape[0]
    scales = {}
    for name, (s1, s2, n) in acc.items():
        mean = s1 / max(int(n), 1)
        var = (s2 / max(int(n), 1) - mean * mean).clamp_min(0.0)
        # the layer's level: its mean channel variance, or where the whole layer is (nearly) constant
        # (an untrained head, a layer the teacher does not use), a thousandth of its mean energy
        level = max(float(var.mean()), ENERGY_LEVEL * float((s2 / max(int(n), 1)).mean())) or 1.0
        scales[name] = var.clamp_min(floor * level).float()
    return scales


def _error(student: dict[str, list[torch.Tensor]], teacher: dict[str, list[torch.Tensor]],
           scales: dict[str, torch.Tensor] | None = None, dims: dict[str, int] | None = None) -> torch.Tensor:
    """Mean over layers of the layer's error, summed over its calls: without ``scales``, relative to
    the teacher's energy (``||s - t||^2 / ||t||^2``); with them, per channel the mean squared error
    over the channel's (floored) variance, averaged over channels (1 = as far off as the channel's
    mean would be)."""
    errs = []
    for name, t_outs in teacher.items():
        if name.startswith("__"):  # the RPN's proposals, the YOLO head's outputs
            continue
        s_outs = student.get(name, [])
        if len(s_outs) != len(t_outs):
            raise PruningError(f"reconstruction: {name} ran {len(s_outs)} times in the pruned model, "
                               f"{len(t_outs)} in the teacher")
        if scales is not None and dims is not None and name in scales:
            d = dims[name]
            sq = [_per_channel((s.float() - t.float()) ** 2, d) for s, t in zip(s_outs, t_outs)]
            per_channel = sum(q.sum(0) for q in sq) / max(sum(q.shape[0] for q in sq), 1)
            errs.append((per_channel / scales[name]).mean())
            continue
        num = sum(((s.float() - t.float()) ** 2).sum() for s, t in zip(s_outs, t_outs))
        den = sum((t.float() ** 2).sum() for t in t_outs)
        errs.append(num / den.clamp_min(1e-12))
    if not errs:
        raise PruningError("reconstruction: no matched layer ran in an inference forward")
    return torch.stack(errs).mean()


def _held_out_error(matcher: _Matcher, batches: list[list[torch.Tensor]], targets: list[dict[str, list[torch.Tensor]]]) -> float:
    with torch.no_grad():
        errs = []
        for images, t in zip(batches, targets):
            matcher.proposals = t.get("__proposals__")
            s = matcher.student(images)
            errs.append(float(matcher.error(s, t)))
    return sum(errs) / len(errs)


def _teacher_targets(matcher: _Matcher, batches: list[list[torch.Tensor]]) -> list[dict[str, Any]]:
    out = []
    for images in batches:
        t: dict[str, Any] = dict(matcher.teacher(images))
        t["__proposals__"] = matcher.proposals
        out.append(t)
    return out


# --------------------------------------------------------------------------------------------
# the step


def _split(batches: list[list[torch.Tensor]], held_out: float) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Calibration and held-out batches: the last ``held_out`` of the batches (at least one) are held
    out; a single batch is split in two halves by image (with one image, it is both)."""
    if len(batches) == 1:
        images = batches[0]
        if len(images) < 2:
            return batches, batches
        half = max(1, min(len(images) - 1, round(len(images) * (1 - held_out))))
        return [images[:half]], [images[half:]]
    n_held = min(len(batches) - 1, max(1, round(len(batches) * held_out)))
    return batches[: len(batches) - n_held], batches[len(batches) - n_held :]


def _augment(batch: list[torch.Tensor], pool: list[list[torch.Tensor]], gen: torch.Generator) -> list[torch.Tensor]:
    """Function matching on new views (Beyer et al., CVPR 2022: the teacher labels any image): each
    image is a random crop (a quarter to all of its area, resized back) mixed with another calibration
    image (weight 0 to 0.5 on the other)."""
    out = []
    flat = [t for b in pool for t in b]
    for img in batch:
        _, h, w = img.shape
        area = float(torch.empty(()).uniform_(0.25, 1.0, generator=gen))
        ch, cw = max(8, round(h * area**0.5)), max(8, round(w * area**0.5))
        y0 = int(torch.randint(0, h - ch + 1, (), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (), generator=gen))
        view = torch.nn.functional.interpolate(img[None, :, y0 : y0 + ch, x0 : x0 + cw], size=(h, w),
                                               mode="bilinear", align_corners=False)[0]
        other = flat[int(torch.randint(0, len(flat), (), generator=gen))]
        if other.shape == view.shape:
            lam = float(torch.empty(()).uniform_(0.0, 0.5, generator=gen))
            view = (1 - lam) * view + lam * other
        out.append(view)
    return out


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    fixed = _fixed(model)
    frozen = {id(p) for n, m in model.named_modules() if n in fixed for p in m.parameters()}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]


def _outside_inference_mode(model: nn.Module) -> None:
    """Tensors a module caches as plain attributes while evaluated under ``torch.inference_mode``
    (Ultralytics' Detect keeps its anchor points and strides until the input shape changes) cannot
    enter a graph that autograd records: replace them by ordinary copies."""
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and value.is_inference():
                setattr(m, name, value.clone())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def reconstruct(
    dense: nn.Module,
    pruned: nn.Module,
    images: Iterable[Any],
    *,
    kept: dict[str, Sequence[int]] | None = None,
    batches: int = DEFAULT_RECOVER_BATCHES,
    steps: int = DEFAULT_STEPS,
    seconds: float = DEFAULT_SECONDS,
    lr: float = DEFAULT_LR,
    held_out: float = DEFAULT_HELD_OUT,
    eval_every: int = DEFAULT_EVAL_EVERY,
    patience: int = DEFAULT_PATIENCE,
    restarts: int = DEFAULT_RESTARTS,
    backoff: float = DEFAULT_BACKOFF,
    match: str = "outputs",
    loss: str = DEFAULT_LOSS,
    floor: float = DEFAULT_FLOOR,
    response: float = DEFAULT_RESPONSE,
    refit: bool = True,
    ridges: Sequence[float] | None = None,
    flip: bool = True,
    augment: bool = DEFAULT_AUGMENT,
    seed: int = 0,
    on_refit: Callable[[nn.Module], Any] | None = None,
) -> ReconstructReport:
    """Make ``pruned`` (cut from ``dense``; changed in place) reproduce ``dense`` on the first
    ``batches`` batches of ``images`` (lists of image tensors, or ``(images, targets)`` batches
    whose targets are never read): least-squares re-fit, then Adam steps on the matched layers'
    error, the best weights by held-out error kept (see the module docstring). ``on_refit(pruned)``
    is called between the two stages (a benchmark scores the re-fit there). ``dense`` is unchanged."""
    if steps < 0 or not seconds > 0 or not lr > 0 or eval_every < 1 or patience < 1 or not 0 < held_out < 1 \
            or not 0 < floor <= 1 or restarts < 0 or not backoff > 1:
        raise PruningError("reconstruction: steps >= 0, seconds > 0, lr > 0, eval_every >= 1, patience >= 1, "
                           "0 < held_out < 1, 0 < floor <= 1, restarts >= 0 and backoff > 1")
    if loss not in LOSSES:
        raise PruningError(f"reconstruction loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    t0, cpu0 = time.perf_counter(), time.process_time()
    imgs = _calibration_images(pruned, images, batches)
    calib, held = _split(imgs, held_out)
    layers = matched_layers(pruned, dense, kept, match=match)
    matcher = _Matcher(dense, pruned, layers, kept or {})
    matcher.response = response if is_ultralytics(pruned) and is_ultralytics(dense) else 0.0
    with _eval_mode(pruned, dense):
        if loss == "variance":
            matcher.scales = channel_scales((matcher.teacher(b) for b in calib), matcher.dims, floor)
        held_targets = _teacher_targets(matcher, held)
        error_cut = _held_out_error(matcher, held, held_targets)
    rec = recover(pruned, dense, calib, kept=kept, batches=len(calib), ridges=ridges) if refit else None
    if on_refit is not None:
        on_refit(pruned)
    with _eval_mode(pruned, dense):
        best_error = error_refit = _held_out_error(matcher, held, held_targets)
        best_state, best_step, history = _state(pruned), 0, [(0, error_refit)]
        _outside_inference_mode(pruned)
        params = _trainable(pruned)
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        stopped, step, bad, lr_now, lr_kept, left = "steps", 0, 0, lr, lr, restarts
        while step < steps:
            if time.perf_counter() - t0 > seconds:
                stopped = "seconds"
                break
            batch = calib[step % len(calib)]
            if flip and bool(torch.rand((), generator=gen) < 0.5):
                batch = [t.flip(-1) for t in batch]
            if augment:
                batch = _augment(batch, calib, gen)
            target = matcher.teacher(batch)
            with torch.enable_grad():
                value = matcher.error(matcher.student(batch), target)
                opt.zero_grad(set_to_none=True)
                value.backward()
            finite = math.isfinite(float(value.detach()))
            if finite:
                opt.step()
                step += 1
            if not finite or step % eval_every == 0 or step == steps:
                err = _held_out_error(matcher, held, held_targets) if finite else math.inf
                history.append((step, err))
                if err < best_error:
                    best_error, best_state, best_step, bad, lr_kept = err, _state(pruned), step, 0, lr_now
                elif best_step == 0 and left > 0:
                    # no step has helped yet: the learning rate is too large for this model; start
                    # again from the re-fit's weights at a smaller one
                    pruned.load_state_dict(best_state)
                    lr_now, left, bad = lr_now / backoff, left - 1, 0
                    opt = torch.optim.Adam(params, lr=lr_now)
                elif not finite:
                    stopped = "non-finite loss"
                    break
                else:
                    bad += 1
                    if bad >= patience:
                        stopped = "no improvement"
                        break
        pruned.load_state_dict(best_state)
    return ReconstructReport(refit=rec, layers=layers, steps=step, best_step=best_step, stopped=stopped,
                             error_cut=error_cut, error_refit=error_refit, error_best=best_error, history=history,
                             calibration_images=sum(len(b) for b in calib),
                             held_out_images=0 if held is calib else sum(len(b) for b in held),
                             seconds=time.perf_counter() - t0, lr=lr_kept, cpu_seconds=time.process_time() - cpu0)


__all__ = ["DEFAULT_AUGMENT", "DEFAULT_FLOOR", "DEFAULT_LOSS", "DEFAULT_RESPONSE", "DEFAULT_LR", "DEFAULT_SECONDS", "DEFAULT_STEPS", "LOSSES", "MATCHES",
           "ReconstructReport", "channel_scales", "matched_layers", "reconstruct"]
