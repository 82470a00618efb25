"""Measurements: parameters and MACs (:mod:`.count`), latency (:mod:`.timing`), file sizes
(:mod:`.size`), and the fixed workload they share (:mod:`.workload`). ``surgery bench``, which
loads checkpoints and writes the CSV, is :mod:`surgery.measure.bench`.

What each number means (they are the numbers users came for, so they are meant to be honest):

- **params**: every parameter element (shared tensors once); **params_nonzero**: those not exactly 0.
  A masked model has the dense shape, so only ``params_nonzero`` drops.
- **MACs**: fvcore's ``FlopCountAnalysis``, which counts one fused multiply-add as one "flop", i.e.
  its numbers *are* MACs. Counted on one ``3 x S x S`` image in eval mode, after the model's own
  ``transform`` (which may resize the image to its ``min_size``). Two-stage models are counted at a
  fixed RoI / detection count (see :func:`.workload.fixed_workload`). Element-wise ops fvcore has no rule for
  (add, mul, sigmoid, nms, topk...) are *not* counted and are listed in ``MacsResult.uncounted``.
  ``torchvision::roi_align`` *is* counted, as its bilinear interpolation cost (see
  :func:`.count._roi_align_macs`). Masked weights are still multiplied on dense hardware, so a masked model
  has the dense model's MACs.
  Why fvcore and not Torch-Pruning's ``count_ops_and_params``: the latter counts ``ConvTranspose2d``
  at the output resolution, i.e. 4x too high for Mask R-CNN's 2x-upsampling mask head; fvcore
  counts a transposed conv at its input resolution, which is right.
- **latency**: timm-benchmark style, warm-up then runs *interleaved* across models (round-robin with
  a rotating start), so drift on a shared machine hits all models alike; median and p90 in ms per
  batch. Masked models are timed with their masks folded into plain weights
  (:func:`surgery.pruning.masked.fold_masks`).
- **peak memory**: CUDA only (``max_memory_allocated`` during the forward, relative to before it,
  plus the model's own weights). On CPU there is no reliable per-model number without a separate
  process (``ru_maxrss`` is a process-wide high-water mark that never goes down, and tracemalloc does
  not see torch's allocator), so it is recorded as ``None``.
- **file size**: bytes of the weights alone (``torch.save`` of the state dict, masks folded in, no
  optimizer state or mask tensors) and of the same bytes gzipped; zeros compress, so masked models
  shrink on disk even though they do not get faster.
"""

from __future__ import annotations

from ..errors import MeasureError
from ..pruning.masked import fold_masks
from .count import MacsResult, ParamCount, count_macs, count_params
from .size import file_size, state_dict_size
from .timing import LatencyResult, measure_latency
from .workload import configured_detections, configured_rois, fixed_workload, is_two_stage

__all__ = [
    "LatencyResult",
    "MacsResult",
    "MeasureError",
    "ParamCount",
    "configured_detections",
    "configured_rois",
    "count_macs",
    "count_params",
    "file_size",
    "fixed_workload",
    "fold_masks",
    "is_two_stage",
    "measure_latency",
    "state_dict_size",
]
