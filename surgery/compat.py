"""Every place surgery reaches into another library's internals, behind small documented functions.

torchvision and Torch-Pruning keep some things we need in private attributes (RPN top-n
dictionaries, SSD default-box templates, the RoI pooler's ONNX branch switch, Torch-Pruning's
module names). They are read and written only here, so a version that renames one of them breaks
one function with one obvious fix instead of several modules (the tested versions are pinned in
``constraints.txt``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only torchvision's and Torch-Pruning's objects are touched at run time
    import torch
    from torch import nn

# --------------------------------------------------------------------------------------------
# torchvision: GeneralizedRCNNTransform (the detectors' resize)


def resizable_transform(model: nn.Module) -> nn.Module | None:
    """The model's ``GeneralizedRCNNTransform``-like ``transform`` if it resizes images to its
    ``min_size``/``max_size``; ``None`` for models without one or with a ``fixed_size`` (SSD)."""
    transform = getattr(model, "transform", None)
    if transform is not None and hasattr(transform, "min_size") and getattr(transform, "fixed_size", None) is None:
        return transform
    return None


def set_resize(model: nn.Module, min_size: tuple[int, ...], max_size: int) -> tuple[tuple[int, ...], int] | None:
    """Make the model's transform resize to ``min_size`` (a tuple, as torchvision keeps it) and
    ``max_size``. Returns the previous ``(min_size, max_size)`` to restore with another call, or
    ``None`` (nothing changed) when the model has no resizable transform."""
    transform = resizable_transform(model)
    if transform is None:
        return None
    old = (transform.min_size, transform.max_size)
    transform.min_size, transform.max_size = min_size, max_size
    return old


# --------------------------------------------------------------------------------------------
# torchvision: RegionProposalNetwork top-n (private dicts {"training": n, "testing": n})

_TOP_N = {"pre": "_pre_nms_top_n", "post": "_post_nms_top_n"}


def rpn_modules(model: nn.Module) -> list[nn.Module]:
    """Modules holding RPN-style pre/post-NMS top-n settings (torchvision's
    ``RegionProposalNetwork`` and look-alikes)."""
    return [m for m in model.modules() if isinstance(getattr(m, _TOP_N["post"], None), dict)]


def rpn_top_n(rpn: nn.Module, stage: str, mode: str) -> int | None:
    """The RPN's ``stage`` (``"pre"`` or ``"post"``) NMS top-n in ``mode`` (``"training"`` or
    ``"testing"``), or ``None`` if ``rpn`` has no such setting."""
    d = getattr(rpn, _TOP_N[stage], None)
    return int(d[mode]) if isinstance(d, dict) and mode in d else None


def set_rpn_top_n(rpn: nn.Module, stage: str, mode: str, value: int) -> int | None:
    """Set one top-n value (see :func:`rpn_top_n`); returns the previous one (``None``: nothing set)."""
    d = getattr(rpn, _TOP_N[stage], None)
    if not isinstance(d, dict) or mode not in d:
        return None
    old = d[mode]
    d[mode] = value
    return old


# --------------------------------------------------------------------------------------------
# torchvision: MultiScaleRoIAlign


@contextlib.contextmanager
def onnx_roi_merge() -> Iterator[None]:
    """Make ``MultiScaleRoIAlign`` merge its levels with the scatter of its ONNX-export branch
    (``_onnx_merge_levels``) instead of ``result[idx] = level_output``. Same values; see
    :mod:`surgery.pruning.graph` (why the dependency trace needs it). torchvision chooses the branch with
    ``torchvision._is_tracing()``, so that is made to answer True during the pooler's call only."""
    import torchvision
    from torchvision.ops import poolers

    original = poolers._multiscale_roi_align

    def patched(*args: Any, **kwargs: Any) -> torch.Tensor:
        saved = torchvision._is_tracing
        torchvision._is_tracing = lambda: True
        try:
            return original(*args, **kwargs)
        finally:
            torchvision._is_tracing = saved

    poolers._multiscale_roi_align = patched
    try:
        yield
    finally:
        poolers._multiscale_roi_align = original


# --------------------------------------------------------------------------------------------
# torchvision: anchor templates of AnchorGenerator / DefaultBoxGenerator


def anchor_templates(gen: nn.Module) -> list[torch.Tensor]:
    """Per feature level, one row per anchor shape: ``AnchorGenerator.cell_anchors`` (xyxy around 0)
    or ``DefaultBoxGenerator``'s private ``_wh_pairs`` (relative widths and heights)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    return list(gen.cell_anchors) if isinstance(gen, AnchorGenerator) else list(gen._wh_pairs)


def set_anchor_templates(gen: nn.Module, templates: list[torch.Tensor]) -> None:
    """Replace the per-level templates (see :func:`anchor_templates`). For a ``DefaultBoxGenerator``
    the anchors-per-location count is pinned to the new row counts: the class derives it as
    ``2 + 2 * len(aspect_ratios)``, which no longer holds once its squares may be gone."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if isinstance(gen, AnchorGenerator):
        gen.cell_anchors = list(templates)
        return
    gen._wh_pairs = list(templates)
    counts = [int(t.shape[0]) for t in templates]
    gen.num_anchors_per_location = lambda counts=counts: list(counts)


# --------------------------------------------------------------------------------------------
# Torch-Pruning


def tp_module_names(dg: Any) -> dict[nn.Module, str]:
    """``{module: qualified name}`` a Torch-Pruning ``DependencyGraph`` built (``_module2name``)."""
    return dg._module2name


def graph_inputs(grad_fn: Any) -> list[tuple[Any, int]]:
    """``(grad_fn, output_nr)`` of every input of an autograd node that Torch-Pruning turns into an
    edge of its graph (``next_functions`` without ``None`` and leaf accumulators), in order."""
    return [(f, nr) for f, nr in grad_fn.next_functions if f is not None and not is_leaf_fn(f)]


def is_leaf_fn(grad_fn: Any) -> bool:
    """An ``AccumulateGrad`` node (a leaf tensor: a parameter or an input)."""
    return "accumulategrad" in grad_fn.name().lower()


def output_shapes(grad_fn: Any) -> list[tuple[int, ...]]:
    """Shapes of the forward outputs of the op behind ``grad_fn`` (autograd's private
    ``_input_metadata``: one entry per output, the gradients it expects); ``[]`` if unavailable."""
    try:
        return [tuple(int(x) for x in m.shape) for m in grad_fn._input_metadata]
    except (AttributeError, TypeError, RuntimeError):
        return []


def tp_group_graph(group: Any) -> Any:
    """The ``DependencyGraph`` a Torch-Pruning ``Group`` came from (``_DG``)."""
    return group._DG


# --------------------------------------------------------------------------------------------
# torch.nn.utils.prune


def remove_prune_reparametrizations(model: nn.Module) -> None:
    """Turn every ``torch.nn.utils.prune`` re-parametrisation (``weight_orig`` x ``weight_mask``
    through a forward pre-hook) back into a plain parameter holding the masked values."""
    from torch.nn.utils import prune as tprune

    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, tprune.BasePruningMethod):
                tprune.remove(module, hook._tensor_name)


# --------------------------------------------------------------------------------------------
# torch.Tensor.detach inside one module's forward (NMS-free YOLO heads)


@contextlib.contextmanager
def attached_detach(module: nn.Module) -> Iterator[None]:
    """While ``module``'s forward runs (and only then), ``Tensor.detach`` returns the tensor itself,
    still attached to autograd. Same values; see :mod:`surgery.pruning.graph` (why the dependency trace
    needs it: Ultralytics' end-to-end heads feed their one-to-one branch ``x.detach()`` in training,
    which hides that branch's coupling to the neck from a trace that walks autograd). The switch is
    made by a forward pre-hook and undone by a forward hook that also runs when the forward fails."""
    import torch

    original = torch.Tensor.detach
    depth = [0]

    def attach(_m: nn.Module, _args: Any) -> None:
        depth[0] += 1
        torch.Tensor.detach = lambda self: self  # type: ignore[method-assign,assignment]

    def restore(_m: nn.Module, _args: Any, _out: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            torch.Tensor.detach = original  # type: ignore[method-assign]

    pre = module.register_forward_pre_hook(attach)
    post = module.register_forward_hook(restore, always_call=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()
        torch.Tensor.detach = original  # type: ignore[method-assign]
