"""Anchor surgery: remove whole anchor shapes from an anchor generator together with exactly the
matching output channels of the heads that predict for them.

torchvision lays head outputs out anchor-major: channel ``a * C + c`` is value ``c`` of anchor
``a`` (``RPN``: ``view(N, A, C, H, W)``; RetinaNet and SSD: ``view(N, -1, C, H, W)``), with C = 1 or
``num_classes`` for scores and 4 for box deltas. Removing anchor ``a`` therefore removes channels
``a*C .. a*C+C-1`` of every output layer of the head, and the surviving anchors' predictions are
unchanged. ``AnchorGenerator`` orders a level's anchors ratio-major (``a = ratio * n_sizes +
size``); ``DefaultBoxGenerator`` (SSD) orders them ``[s_k square, s'_k square, (ar, 1/ar) ...]``.

The heads are found as the modules beside the generator (``parent.anchor_generator`` and
``parent.head``: torchvision's RPN, RetinaNet and SSD/SSDlite, and user-built detectors made of
them) and their output layers come from the dependency graph.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator

from .. import compat
from ..config.recipe import AnchorSection
from ..errors import PruningError, RecipeError
from ..pruning.graph import trace


def _generators(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(path, generator, parent) for every anchor generator with a sibling ``head``."""
    found = []
    for name, module in model.named_modules():
        gen = getattr(module, "anchor_generator", None)
        if isinstance(gen, (AnchorGenerator, DefaultBoxGenerator)) and hasattr(module, "head"):
            found.append((f"{name}.anchor_generator" if name else "anchor_generator", gen, module))
    return found


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def _anchor_keep(gen: nn.Module, cfg: AnchorSection, path: str) -> list[list[int]]:
    keep: list[list[int]] = []
    if isinstance(gen, AnchorGenerator):
        for level, (sizes, ratios) in enumerate(zip(gen.sizes, gen.aspect_ratios)):
            if cfg.keep_sizes is not None:
                bad = [i for i in cfg.keep_sizes if not 0 <= i < len(sizes)]
                if bad:
                    raise PruningError(f"{path}: size index {bad[0]} out of range; level {level} has sizes {list(sizes)}")
            if cfg.keep_aspect_ratios is not None and not any(
                _close(r, k) for r in ratios for k in cfg.keep_aspect_ratios
            ):
                raise PruningError(
                    f"{path}: none of the aspect ratios {cfg.keep_aspect_ratios} exist at level {level} "
                    f"(it has {list(ratios)})"
                )
            idx = []
            for r_i, r in enumerate(ratios):
                for s_i in range(len(sizes)):
                    if cfg.keep_sizes is not None and s_i not in cfg.keep_sizes:
                        continue
                    if cfg.keep_aspect_ratios is not None and not any(_close(r, k) for k in cfg.keep_aspect_ratios):
                        continue
                    idx.append(r_i * len(sizes) + s_i)
            keep.append(idx)
    else:  # DefaultBoxGenerator
        if cfg.keep_sizes is not None:
            raise PruningError(f"{path}: SSD default boxes support keep_aspect_ratios only (squares have ratio 1.0)")
        wanted = cfg.keep_aspect_ratios
        for level, ars in enumerate(gen.aspect_ratios):
            idx = []
            if wanted is None or any(_close(1.0, k) for k in wanted):
                idx += [0, 1]
            for j, ar in enumerate(ars):
                if wanted is None or any(_close(ar, k) or _close(1.0 / ar, k) for k in wanted):
                    idx += [2 + 2 * j, 3 + 2 * j]
            if not idx:
                raise PruningError(f"{path}: keeping aspect ratios {wanted} leaves no box at level {level}")
            keep.append(idx)
    return keep


def _level_of(layer_name: str, head_prefix: str) -> int | None:
    """SSD heads hold one conv per level under ``module_list.<level>``; shared heads return None."""
    m = re.search(r"module_list\.(\d+)", layer_name[len(head_prefix):])
    return int(m.group(1)) if m else None


def apply_anchor_plan(model: nn.Module, plan: dict[str, Any] | None) -> None:
    """Re-apply the generator part of an anchor plan (used when a checkpoint is rebuilt; the heads'
    widths come from the saved weights)."""
    if not plan:
        return
    for entry in plan.get("generators", []):
        gen = model.get_submodule(entry["path"])
        _filter_generator(gen, entry["keep"])
        parent = model.get_submodule(entry["path"].rpartition(".")[0]) if "." in entry["path"] else model
        _sync_num_anchors(parent, entry["keep"])


def _filter_generator(gen: nn.Module, keep: list[list[int]]) -> None:
    templates = [t[torch.as_tensor(k, dtype=torch.long)] for t, k in zip(compat.anchor_templates(gen), keep)]
    compat.set_anchor_templates(gen, templates)
    if isinstance(gen, AnchorGenerator):
        new_sizes, new_ratios = [], []
        for sizes, ratios, k in zip(gen.sizes, gen.aspect_ratios, keep):
            s_keep = sorted({i % len(sizes) for i in k})
            r_keep = sorted({i // len(sizes) for i in k})
            new_sizes.append(tuple(sizes[i] for i in s_keep))
            new_ratios.append(tuple(ratios[i] for i in r_keep))
        gen.sizes, gen.aspect_ratios = tuple(new_sizes), tuple(new_ratios)
    else:
        gen.aspect_ratios = [
            [ar for j, ar in enumerate(ars) if 2 + 2 * j in k] for ars, k in zip(gen.aspect_ratios, keep)
        ]


def _sync_num_anchors(parent: nn.Module, keep: list[list[int]]) -> None:
    if len({len(k) for k in keep}) == 1:
        for m in parent.head.modules():
            if isinstance(getattr(m, "num_anchors", None), int):
                m.num_anchors = len(keep[0])


def prune_anchors(model: nn.Module, cfg: AnchorSection, output_layers: list[str] | None = None) -> dict[str, Any]:
    """Remove anchor shapes in place; returns the JSON-able anchor plan."""
    gens = _generators(model)
    if not gens:
        raise PruningError("anchor surgery: this model has no anchor generator with a prediction head")
    if output_layers is None:
        output_layers = trace(model).output_layers
    names = dict(model.named_modules())
    plan: dict[str, Any] = {"generators": [], "heads": []}
    for path, gen, parent in gens:
        counts = list(gen.num_anchors_per_location())
        if all(c == 1 for c in counts) and isinstance(gen, AnchorGenerator) and type(parent).__name__ == "FCOS":
            raise PruningError("anchor surgery: FCOS is anchor-free (one point per location); nothing to remove")
        keep = _anchor_keep(gen, cfg, path)
        head_prefix = path.rpartition(".")[0] + ".head" if "." in path else "head"
        heads = [n for n in output_layers if n.startswith(head_prefix + ".")]
        if not heads:
            raise PruningError(f"anchor surgery: no output layer found under {head_prefix}")
        for layer_name in heads:
            conv = names[layer_name]
            level = _level_of(layer_name, head_prefix)
            levels = [level] if level is not None else list(range(len(counts)))
            if len({counts[lv] for lv in levels}) != 1 or len({len(keep[lv]) for lv in levels}) != 1:
                raise PruningError(f"{layer_name} is shared across levels with different anchor counts")
            a_count = counts[levels[0]]
            if conv.out_channels % a_count:
                raise PruningError(f"{layer_name}: {conv.out_channels} outputs do not split into {a_count} anchors")
            c = conv.out_channels // a_count
            kept = set(keep[levels[0]])
            drop = [a * c + j for a in range(a_count) if a not in kept for j in range(c)]
            if drop:
                with torch.no_grad():
                    tp.prune_conv_out_channels(conv, drop)
            plan["heads"].append({"layer": layer_name, "values_per_anchor": c, "out_channels": conv.out_channels})
        _filter_generator(gen, keep)
        _sync_num_anchors(parent, keep)
        plan["generators"].append({"path": path, "type": type(gen).__name__, "keep": keep, "before": counts})
    return plan


def parse_anchor_spec(text: str | None) -> dict | None:
    """``"ratios=0.5,1.0;sizes=0"`` (the CLI's ``--anchors``) -> an ``AnchorSection`` dict."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(";"):
        key, _, vals = part.partition("=")
        key = key.strip()
        try:
            if key in ("ratios", "aspect_ratios", "keep_aspect_ratios"):
                out["keep_aspect_ratios"] = [float(v) for v in vals.split(",") if v.strip()]
            elif key in ("sizes", "keep_sizes"):
                out["keep_sizes"] = [int(v) for v in vals.split(",") if v.strip()]
            else:
                raise ValueError(key)
        except ValueError:
            raise RecipeError(
                f"--anchors {text!r}: expected 'ratios=R1,R2' and/or 'sizes=I1,I2' separated by ';'"
            ) from None
    return out
