"""Channel-dependency analysis of a whole detector.

We use Torch-Pruning's ``DependencyGraph`` for the coupling rules (residual adds, concats, flatten
into ``Linear``, depthwise convs, norm layers) and fix what it gets wrong on detectors:

1. **Trace in train mode with dummy targets.** Torch-Pruning walks autograd back from the outputs.
   In eval mode torchvision's RPN detaches its outputs and the ROI heads only see detached
   proposals, so the RPN head is never coupled to the FPN (and Faster R-CNN pruning then fails
   with "expected input[1, 128, ...] to have 256 channels"). In train mode every head feeds a
   loss. Norm layers and dropout are kept in eval mode so running statistics are untouched.
2. **Trace from the output layers, not from the loss.** We find the layers whose outputs reach
   the loss without passing through another layer (class logits, box deltas, mask and keypoint
   logits, centerness: the *output layers*) by walking autograd from the loss, and give their
   outputs to Torch-Pruning as the model outputs. The loss arithmetic (gathers, sums, matching)
   would otherwise look like element-wise ops that couple unrelated channels and slows grouping
   down by seconds. Output layers' output channels are never cut by filter pruning; they are
   found from the graph, not from a per-model list of names.
3. **Multi-scale RoIAlign.** torchvision writes ``result[idx_in_level] = roi_align(...)``; when a
   level gets exactly one RoI, autograd records a view that Torch-Pruning mistakes for a flatten
   and its index sets explode (a 24 GB kill, seed-dependent). During tracing we make the pooler
   take its own ONNX-export branch (``_onnx_merge_levels``, a ``scatter``), which computes the
   same result through an op Torch-Pruning treats as element-wise.
4. **Frozen parameters.** Layers with ``requires_grad=False`` (frozen stages of pretrained
   backbones) drop out of the autograd graph and would silently never be pruned; every parameter
   requires grad during the trace and is restored afterwards.
5. **FrozenBatchNorm2d** (pretrained torchvision detectors) keeps its affine parameters in
   buffers that Torch-Pruning does not know; a customised pruner cuts all four consistently.
6. **Splits and concats** (YOLO's C2f/C3k2 ``chunk``, the neck's concats, a reorg layer): Torch-
   Pruning's index maps for them are wrong on current PyTorch; :mod:`surgery.pruning.index_maps` replaces
   them with maps read from autograd, and groups feeding a ``chunk`` are cut equally per chunk.
7. **Wrapped networks** whose internals Torch-Pruning cannot read may give hooks: a model's
   ``trace_context()`` (a context manager around the trace) and ``fixed_channels()`` (``{layer:
   reason}``: groups producing from those layers are never cut). The Ultralytics adapter uses
   them for C2PSA attention (see :mod:`surgery.yolo.ultralytics_adapter`).
   ``head_layers()`` names the detection head (the ``skip`` entry :data:`HEAD`, recipe key
   ``prune.keep_head``: every group produced entirely inside the head keeps its width).
8. **Speed.** The detector's input transform is shrunk to a small size for the trace (channel
   coupling does not depend on resolution), so analysis takes about a second on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torchvision.ops import misc as tv_misc

from .. import compat
from ..errors import PruningError
from .index_maps import chunk_roots, cut_constraint, fix_index_maps

# Layers that consume channels (their input channels are cut when a producer is cut) and whose
# output channels can be the root of a group.
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    tv_misc.FrozenBatchNorm2d,
)


class FrozenBatchNormPruner(tp.pruner.function.BasePruningFunc):
    """Cuts ``weight``, ``bias``, ``running_mean`` and ``running_var`` (all buffers) together."""

    TARGET_MODULES = tv_misc.FrozenBatchNorm2d

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        keep = torch.tensor([i for i in range(layer.weight.shape[0]) if i not in drop], dtype=torch.long)
        for name in ("weight", "bias", "running_mean", "running_var"):
            buf = getattr(layer, name)
            layer.register_buffer(name, torch.index_select(buf, 0, keep.to(buf.device)).contiguous())
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return int(layer.weight.shape[0])

    get_in_channels = get_out_channels


@dataclass
class ChannelGroup:
    """A set of coupled channels: cutting channel ``i`` of the root cuts it everywhere below."""

    index: int
    root: str  # layer whose output channels index the group
    channels: int
    producers: list[str]  # layers whose output channels are cut (convs, linears, norms)
    consumers: list[str]  # layers whose input channels are cut
    norm_groups: int = 1  # GroupNorm num_groups the width must stay divisible by
    chunks: int = 1  # equal chunks the channels are split into at run time (C2f's chunk(2))
    prunable: bool = True
    reason: str = ""  # why not prunable ("output layer", "skipped by 'pattern'")
    tp_group: Any = field(default=None, repr=False)

    @property
    def multiple_of(self) -> int:
        """The kept width must be a multiple of this (GroupNorm groups and chunks)."""
        return math.lcm(max(1, self.norm_groups), max(1, self.chunks))

    @property
    def layers(self) -> list[str]:
        return sorted(set(self.producers) | set(self.consumers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "root": self.root,
            "channels": self.channels,
            "producers": list(self.producers),
            "consumers": list(self.consumers),
            "prunable": self.prunable,
            "reason": self.reason,
        }


@dataclass
class DetectorGraph:
    """The dependency graph of one detector instance (valid until its layers are cut)."""

    model: nn.Module
    dg: tp.DependencyGraph
    output_layers: list[str]
    groups: list[ChannelGroup]
    trace_size: int

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def group_of(self, layer: str) -> ChannelGroup:
        for g in self.groups:
            if layer in g.producers:
                return g
        raise KeyError(layer)


# --------------------------------------------------------------------------------------------
# tracing helpers


@contextlib.contextmanager
def _trace_mode(model: nn.Module, size: int) -> Iterator[None]:
    """Train mode with frozen statistics, every parameter requiring grad, a small input size."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    saved_sizes = compat.set_resize(model, (size,), size)
    # Fewer proposals and sampled RoIs: the coupling is the same, the ROI heads run 10x faster.
    saved_counts = _shrink_roi_counts(model)
    try:
        model.train()
        for m in model.modules():
            if isinstance(m, NORM_TYPES + (nn.Dropout,)):
                m.eval()
        for p in model.parameters():
            p.requires_grad_(True)
        hook = getattr(model, "trace_context", None)
        with torch.enable_grad(), compat.onnx_roi_merge(), (hook() if callable(hook) else contextlib.nullcontext()):
            yield
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for p, g in grads.items():
            p.requires_grad_(g)
        if saved_sizes is not None:
            compat.set_resize(model, *saved_sizes)
        for undo in reversed(saved_counts):
            undo()


def _shrink_roi_counts(model: nn.Module, rois: int = 32) -> list[Callable[[], Any]]:
    """Cap the RPN's training top-n and the samplers' RoIs per image at ``rois``; returns undo steps."""
    undo: list[Callable[[], Any]] = []
    for rpn in compat.rpn_modules(model):
        for stage in ("pre", "post"):
            old = compat.rpn_top_n(rpn, stage, "training")
            if old is not None:
                compat.set_rpn_top_n(rpn, stage, "training", min(old, rois))
                undo.append(lambda rpn=rpn, stage=stage, old=old: compat.set_rpn_top_n(rpn, stage, "training", old))
    for m in model.modules():
        sampler = getattr(m, "fg_bg_sampler", None)  # RPN and RoIHeads samplers
        if sampler is not None and hasattr(sampler, "batch_size_per_image"):
            undo.append(lambda s=sampler, n=sampler.batch_size_per_image: setattr(s, "batch_size_per_image", n))
            sampler.batch_size_per_image = min(sampler.batch_size_per_image, rois)
    return undo


def dummy_inputs(model: nn.Module, size: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """One image and targets with whatever the model's losses need (boxes, labels, masks,
    keypoints), following torchvision's detection interface."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, size, size, generator=g).to(device)
    s = size
    boxes = torch.tensor([[0.1 * s, 0.15 * s, 0.6 * s, 0.7 * s], [0.4 * s, 0.3 * s, 0.9 * s, 0.95 * s]])
    target: dict[str, torch.Tensor] = {"boxes": boxes, "labels": torch.tensor([1, 1])}
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None and callable(getattr(roi_heads, "has_mask", None)) and roi_heads.has_mask():
        masks = torch.zeros(2, s, s, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        target["masks"] = masks
    if roi_heads is not None and callable(getattr(roi_heads, "has_keypoint", None)) and roi_heads.has_keypoint():
        last = [m for m in roi_heads.keypoint_predictor.modules() if isinstance(m, nn.modules.conv._ConvNd)][-1]
        num_kp = last.out_channels
        kps = torch.zeros(2, num_kp, 3)
        for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            kps[k, :, 0] = torch.linspace(x0 + 1, x1 - 1, num_kp)
            kps[k, :, 1] = torch.linspace(y0 + 1, y1 - 1, num_kp)
        kps[..., 2] = 1
        target["keypoints"] = kps
    return [image], [{k: v.to(device) for k, v in target.items()}]


def _losses_to_scalar(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.sum()
    if isinstance(out, dict):
        vals = [v for v in out.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    elif isinstance(out, (list, tuple)):
        vals = [_losses_to_scalar(v) for v in out]
    else:
        vals = []
    if not vals:
        raise PruningError(
            "the model returned no differentiable loss in train mode with targets; surgery needs a detector "
            "that follows torchvision's interface (model(images, targets) -> dict of losses)"
        )
    return sum(v.sum() for v in vals)


def _find_output_layers(loss: torch.Tensor, outputs: dict[Any, nn.Module]) -> list[nn.Module]:
    """Layers reached from the loss without passing through another layer."""
    found: list[nn.Module] = []
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        module = outputs.get(fn)
        if module is not None:
            if module not in found:
                found.append(module)
            continue
        for nxt, _ in getattr(fn, "next_functions", ()):
            if nxt is not None and nxt not in seen:
                stack.append(nxt)
    return found


# --------------------------------------------------------------------------------------------


def _recorded_loss(m: nn.Module, inputs: Any) -> tuple[list[nn.Module], dict[nn.Module, list[torch.Tensor]]]:
    """Run ``m`` on ``(images, targets)`` in the trace mode, recording every layer's outputs; return
    the output layers (reached from the loss without passing through another layer) and what each
    layer returned."""
    layer_outputs: dict[Any, nn.Module] = {}
    recorded: dict[nn.Module, list[torch.Tensor]] = {}

    def record(module: nn.Module, _inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            layer_outputs[out.grad_fn] = module
            recorded.setdefault(module, []).append(out)

    m.train()
    for sub in m.modules():
        if isinstance(sub, NORM_TYPES + (nn.Dropout,)):
            sub.eval()
    hooks = [sub.register_forward_hook(record) for sub in m.modules() if isinstance(sub, LAYER_TYPES)]
    try:
        images, targets = inputs
        loss = _losses_to_scalar(m(images, targets))
    finally:
        for h in hooks:
            h.remove()
    return _find_output_layers(loss, layer_outputs), recorded


def output_layers(model: nn.Module, trace_size: int = 128) -> list[str]:
    """Names of the detector's output layers (class logits, box deltas, centerness, mask and
    keypoint logits, SSD per-level predictors), found from the autograd graph of its training
    loss on dummy targets as :func:`trace` finds them; the model is left as it was."""
    names = {m: n for n, m in model.named_modules()}
    with _trace_mode(model, trace_size):
        try:
            found, _ = _recorded_loss(model, dummy_inputs(model, trace_size))
        except PruningError:
            raise
        except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as e:
            raise PruningError(
                f"cannot run {type(model).__name__} in train mode with dummy targets to find its output layers: {e}"
            ) from e
    return [names[m] for m in found]


HEAD = "@head"  # a ``skip`` entry: the detection head's own widths are kept (recipe key prune.keep_head)


def head_layers(model: nn.Module) -> list[str]:
    """The module names of ``model``'s detection head: its ``head_layers()`` when it has one (the
    Ultralytics adapter: the Detect module), else torchvision's ``head`` (one-stage: FCOS, RetinaNet,
    SSD) or ``rpn.head`` and ``roi_heads`` (two-stage). A model with none of these is refused."""
    named = getattr(model, "head_layers", None)
    if callable(named):
        return list(named())
    modules = dict(model.named_modules())
    if isinstance(modules.get("head"), nn.Module):
        return ["head"]
    if isinstance(modules.get("roi_heads"), nn.Module):
        return [n for n in ("rpn.head", "roi_heads") if n in modules]
    raise PruningError(f"keep_head: {type(model).__name__} names no detection head (no head_layers(), 'head' or "
                       "'roi_heads' module); list the head's layers in prune.skip instead")


def trace(model: nn.Module, *, trace_size: int = 256, skip: Sequence[str] = ()) -> DetectorGraph:
    """Build the channel-dependency graph of ``model`` and its coupled channel groups.

    ``skip``: layer-name globs whose channels must never be cut (groups containing them are
    marked not prunable). The entry :data:`HEAD` keeps the detection head's widths
    (:func:`head_layers`): a group is kept when *every* layer producing its channels lies inside
    the head, so the head's inner convs keep their widths while the neck outputs it reads (which a
    depthwise conv at a branch's entry shares with the neck) are still cut.
    """
    all_names = {m: n for n, m in model.named_modules()}
    leaf_outputs: list[torch.Tensor] = []
    output_modules: list[nn.Module] = []

    def forward_fn(m: nn.Module, inputs: Any) -> list[torch.Tensor]:
        # Torch-Pruning calls model.eval() right before this; _recorded_loss switches to the trace mode.
        found, recorded = _recorded_loss(m, inputs)
        output_modules.extend(found)
        for om in output_modules:
            leaf_outputs.extend(recorded[om])
        return leaf_outputs

    with _trace_mode(model, trace_size):
        inputs = dummy_inputs(model, trace_size)
        try:
            dg = tp.DependencyGraph().build_dependency(
                model,
                inputs,
                forward_fn=forward_fn,
                customized_pruners={tv_misc.FrozenBatchNorm2d: FrozenBatchNormPruner()},
                verbose=False,
            )
            fix_index_maps(dg)
        except PruningError:
            raise
        except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as e:
            raise PruningError(
                f"cannot trace {type(model).__name__} in train mode with dummy targets: {e}. surgery needs a "
                "detector that follows torchvision's interface (list of images + targets -> dict of losses)"
            ) from e
    # Torch-Pruning's _trace leaves the model in eval mode; _trace_mode restored the original modes.

    output_names = [all_names[m] for m in output_modules]
    fixed = getattr(model, "fixed_channels", None)
    head = head_layers(model) if HEAD in skip else []
    groups = _collect_groups(dg, model, output_modules, [p for p in skip if p != HEAD],
                             fixed() if callable(fixed) else {}, head)
    return DetectorGraph(model=model, dg=dg, output_layers=output_names, groups=groups, trace_size=trace_size)


def match_layer(name: str, patterns: Sequence[str]) -> str | None:
    """The first of ``patterns`` that names layer ``name``, or ``None``. A pattern names a layer
    when it matches it as a glob (``fnmatchcase``: ``head.*``, ``backbone.body.layer?``) or is the
    layer itself or one of its parents (``backbone.fpn`` names ``backbone.fpn.inner_blocks.0``).
    Used for ``skip`` and ``overrides`` alike."""
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or name == p or name.startswith(p + "."):
            return p
    return None


def _collect_groups(
    dg: tp.DependencyGraph, model: nn.Module, output_modules: list[nn.Module], skip: Sequence[str],
    fixed: dict[str, str] | None = None, head: Sequence[str] = (),
) -> list[ChannelGroup]:
    names = compat.tp_module_names(dg)
    groups: list[ChannelGroup] = []
    visited: set[nn.Module] = set()
    outputs = set(output_modules)
    modules = list(dg.module2node.keys())
    for module in dict.fromkeys(chunk_roots(dg, LAYER_TYPES) + modules):
        if not isinstance(module, LAYER_TYPES) or module in visited:
            continue
        pruner = dg.get_pruner_of_module(module)
        if pruner is None:
            continue
        n = pruner.get_out_channels(module)
        if n is None:
            continue
        group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(n)))
        producers, consumers = [], []
        norm_groups = 1
        is_output = False
        for dep, _ in group:
            target = dep.target.module
            if not isinstance(target, nn.Module) or target not in names:
                continue
            tname = names[target]
            if dg.is_out_channel_pruning_fn(dep.handler):
                visited.add(target)
                if tname not in producers:
                    producers.append(tname)
                if target in outputs:
                    is_output = True
                if isinstance(target, nn.GroupNorm):
                    norm_groups = max(norm_groups, target.num_groups)
            elif dg.is_in_channel_pruning_fn(dep.handler) and tname not in consumers:
                consumers.append(tname)
        chunks, unsafe = cut_constraint(group)
        cg = ChannelGroup(
            index=len(groups),
            root=names[module],
            channels=int(n),
            producers=producers,
            consumers=consumers,
            norm_groups=norm_groups,
            chunks=chunks,
            tp_group=group,
        )
        if is_output:
            cg.prunable, cg.reason = False, "output layer"
        elif unsafe:
            cg.prunable, cg.reason = False, unsafe
        elif any(x in (fixed or {}) for x in producers):
            cg.prunable, cg.reason = False, next((fixed or {})[x] for x in producers if x in (fixed or {}))
        else:
            hit = next((p for p in (match_layer(x, skip) for x in producers) if p), None)
            if hit:
                cg.prunable, cg.reason = False, f"skipped by {hit!r}"
            elif head and producers and all(match_layer(x, head) for x in producers):
                cg.prunable, cg.reason = False, "detection head (keep_head)"
            elif n <= 1:
                cg.prunable, cg.reason = False, "single channel"
        groups.append(cg)
    return groups
