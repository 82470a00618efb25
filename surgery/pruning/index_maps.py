"""Correct channel index maps for ``split``/``chunk``, ``cat`` and ``pixel_unshuffle`` in a
Torch-Pruning dependency graph.

Torch-Pruning 1.6.1 gets tensor splits wrong on current PyTorch, which is why its MetaPruner fails
on YOLOv8's C2f (``IndexError: index 384 is out of bounds for dimension 0 with size 256``):

1. Its graph has one node per op and one edge per *consumer*, not per split output. C2f does
   ``y = list(cv1(x).chunk(2, 1)); y.extend(m(y[-1]) ...); cv2(cat(y))``: the split node gets four
   outputs (the concat twice, the bottleneck's conv, the shortcut add) and Torch-Pruning assumes
   output ``i`` reads chunk ``i``.
2. Split sizes come from ``grad_fn._saved_self_sizes``, which PyTorch 2.x calls
   ``_saved_self_sym_sizes``; the fallback infers one size per consumer edge from the consumers'
   input widths (48, 48, 16, 16 for a 32-channel chunk(2)), so the offsets run past the tensor.
3. A concat fed twice by the same split node (C2f's ``cat([y0, y1, ...])``) gets no offsets at all.

The fix reads what autograd recorded: every consumer's ``next_functions`` entry says which output
(``output_nr``) of the split it reads, and each op's recorded output shape gives the exact channel
count of every split chunk and concat input. Each edge then gets a map that computes its offsets
from the op's *current* sizes at call time (the ops' pruners keep those sizes up to date while
groups are cut one after another), and Torch-Pruning's own (wrong) maps for these nodes are
switched off (``enable_index_mapping = False``) so its per-group refresh does not overwrite them.

``pixel_unshuffle`` (YOLOv2's passthrough/reorg layer) moves each input channel ``c`` to outputs
``4c..4c+3``; Torch-Pruning treats it as element-wise (one-to-one), so it gets a map too.

Chunks must stay equal: ``chunk(n)`` recomputes its split point at run time. :func:`chunk_blocks`
(:func:`cut_constraint`) tells the planner to cut the same number of channels from each chunk.
"""

from __future__ import annotations

from typing import Any

from torch_pruning import _helpers, ops

from .. import compat


def _channel_dim(grad_fn: Any, ndim: int) -> bool:
    """The op works on dim 1 (channels), as ``_saved_dim`` records it (possibly negative)."""
    dim = getattr(grad_fn, "_saved_dim", 1)
    return ndim >= 2 and dim in (1, 1 - ndim)


def _hybrid(idx: int, root: Any) -> Any:
    return _helpers._HybridIndex(idx=idx, root_idx=root)


class _Segment:
    """Channels ``[offsets[pos], offsets[pos + 1])`` of a split input / concat output, with the
    offsets read from ``holder.<attr>`` (a live list of sizes) at call time.

    ``into``: map a whole-tensor index to a segment index (drop those outside), else the reverse."""

    def __init__(self, holder: Any, attr: str, pos: int, into: bool) -> None:
        self.holder, self.attr, self.pos, self.into = holder, attr, pos, into

    def __call__(self, idxs: list[Any]) -> list[Any]:
        sizes = getattr(self.holder, self.attr)
        start = sum(sizes[: self.pos])
        end = start + sizes[self.pos]
        if self.into:
            return [_hybrid(i.idx - start, i.root_idx) for i in idxs if start <= i.idx < end]
        return [_hybrid(i.idx + start, i.root_idx) for i in idxs]


class _Spread:
    """``pixel_unshuffle(r)``: channel ``c`` becomes ``c*k .. c*k+k-1`` (``k = r*r``), and back."""

    def __init__(self, k: int, forward: bool) -> None:
        self.k, self.forward = k, forward

    def __call__(self, idxs: list[Any]) -> list[Any]:
        if self.forward:
            return [_hybrid(i.idx * self.k + j, i.root_idx) for i in idxs for j in range(self.k)]
        seen: dict[int, Any] = {}
        for i in idxs:
            seen.setdefault(i.idx // self.k, _hybrid(i.idx // self.k, i.root_idx))
        return list(seen.values())


def _edges(consumer: Any, producer: Any) -> list[int]:
    """Which outputs (``output_nr``) of ``producer``'s op ``consumer`` reads, in the order
    Torch-Pruning added the edges (its ``next_functions`` order, leaves and ``None`` skipped)."""
    return [nr for fn, nr in compat.graph_inputs(consumer.grad_fn) if fn is producer.grad_fn]


def _deps(src: Any, dst: Any) -> list[Any]:
    return [d for d in src.dependencies if d.target is dst]


def fix_index_maps(dg: Any) -> None:
    """Replace Torch-Pruning's index maps of channel splits, concats and pixel-unshuffles in ``dg``
    (a built ``DependencyGraph``) by correct ones (see the module docstring)."""
    nodes = list(dg.module2node.values())
    splits = [n for n in nodes if n.type == ops.OPTYPE.SPLIT and _read_split(n)]
    concats = [n for n in nodes if n.type == ops.OPTYPE.CONCAT and _read_concat(n)]
    # Torch-Pruning already put its maps on these edges (a split->concat edge carries two): clear
    # them all first, then a split sets slot 0 of its outgoing and slot 1 of its returning edges,
    # a concat slot 1 of its incoming and slot 0 of its returning edges.
    for node in splits:
        for out in node.outputs:
            for d in _deps(node, out) + _deps(out, node):
                d.index_mapping = [None, None]
    for node in concats:
        for src in node.inputs:
            for d in _deps(src, node) + _deps(node, src):
                d.index_mapping = [None, None]
    for node in splits:
        for out in dict.fromkeys(node.outputs):  # each consumer once, in order
            for nr, d_fwd, d_back in zip(_edges(out, node), _deps(node, out), _deps(out, node)):
                d_fwd.index_mapping[0] = _Segment(node.module, "split_sizes", nr, into=True)
                d_back.index_mapping[1] = _Segment(node.module, "split_sizes", nr, into=False)
    for node in concats:
        pos_of: dict[Any, list[int]] = {}
        for pos, (f, _) in enumerate(node.grad_fn.next_functions):
            pos_of.setdefault(f, []).append(pos)
        for src in dict.fromkeys(node.inputs):
            positions = pos_of.get(src.grad_fn, [])
            for pos, d_fwd, d_back in zip(positions, _deps(src, node), _deps(node, src)):
                d_fwd.index_mapping[1] = _Segment(node.module, "concat_sizes", pos, into=False)
                d_back.index_mapping[0] = _Segment(node.module, "concat_sizes", pos, into=True)
    for node in nodes:
        if node.grad_fn is not None and node.grad_fn.name() == "PixelUnshuffleBackward0":
            _fix_unshuffle(node)


def _read_split(node: Any) -> bool:
    """Record a channel split's chunk sizes (autograd's output shapes); False for other splits."""
    fn = node.grad_fn
    shapes = compat.output_shapes(fn)
    if not shapes or not _channel_dim(fn, len(shapes[0])):
        node.module.other_dim = True  # e.g. attention heads: channels reshaped, then split
        return False
    node.module.split_sizes = [int(s[1]) for s in shapes]
    node.module.offsets = None  # Torch-Pruning's own mapping code skips a split without offsets
    # chunk() recomputes its split point from the width at run time, and modules that split into
    # equal sizes keep one width attribute (Ultralytics' ``split((self.c, self.c))``): keep them equal
    sizes = node.module.split_sizes
    node.module.chunked = len(sizes) > 1 and (hasattr(fn, "_saved_split_size") or len(set(sizes)) == 1)
    node.enable_index_mapping = False
    return True


def _read_concat(node: Any) -> bool:
    """Record a channel concat's input widths; False when one is unknown (an input Torch-Pruning
    does not see: its own maps stay)."""
    fn = node.grad_fn
    shapes = compat.output_shapes(fn)
    entries = list(fn.next_functions)
    if not shapes or not _channel_dim(fn, len(shapes[0])):
        return False
    if any(f is None or compat.is_leaf_fn(f) for f, _ in entries):
        return False
    node.module.concat_sizes = [int(compat.output_shapes(f)[nr][1]) for f, nr in entries]
    node.enable_index_mapping = False
    return True


def _fix_unshuffle(node: Any) -> None:
    shapes = compat.output_shapes(node.grad_fn)
    if not shapes or len(node.inputs) != 1:
        return
    src = node.inputs[0]
    (f, nr), *_ = list(compat.graph_inputs(node.grad_fn))
    k = int(shapes[0][1]) // int(compat.output_shapes(f)[nr][1])
    for d in _deps(src, node):
        d.index_mapping[0] = _Spread(k, forward=True)
    for d in _deps(node, src):
        d.index_mapping[0] = _Spread(k, forward=False)


def chunk_roots(dg: Any, layer_types: tuple[type, ...]) -> list[Any]:
    """Layers whose output channels reach a ``chunk`` one-to-one (through norms and activations).
    Grouping must start from them: a group rooted at a layer that sees only one chunk (C2f's
    bottleneck, coupled to chunk 1 by its shortcut) would leave the other chunk uncuttable."""
    roots: list[Any] = []
    for node in dg.module2node.values():
        if node.type != ops.OPTYPE.SPLIT or not getattr(node.module, "chunked", False):
            continue
        cur = node
        while len(cur.inputs) == 1:
            cur = cur.inputs[0]
            if isinstance(cur.module, layer_types):
                roots.append(cur.module)
                break
            if cur.type not in (ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.BN) or len(cur.outputs) != 1:
                break
    return roots


def cut_constraint(group: Any) -> tuple[int, str]:
    """``(blocks, reason)`` for a Torch-Pruning group: its root channels must be cut equally from
    ``blocks`` consecutive blocks (they feed a ``chunk(blocks)`` directly, index ``i`` of the root
    being index ``i`` of the split input); a non-empty ``reason`` says why it cannot be cut at all
    (its channels reach a split on another dimension, such as attention's query/key/value heads
    after a reshape, or a chunk through another index map)."""
    blocks = 1
    for item in group:
        module = item.dep.target.module
        if getattr(module, "other_dim", False):
            return 1, "channels reshaped and split on another dimension (attention heads)"
        if not getattr(module, "chunked", False):
            continue
        if [int(i) for i in item.idxs] != [int(r) for r in item.root_idxs]:
            return 1, "feeds a chunk through an index map"
        blocks = max(blocks, len(module.split_sizes))
    return blocks, ""
