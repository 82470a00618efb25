"""The model registry's torch-free core: :class:`ModelSpec` (what a checkpoint records to rebuild a
model), the builder registry (:func:`register_model`) and the ``scheme:reference`` resolvers
(:func:`register_scheme`, :func:`scheme_of`).

It imports nothing else of the project (nor torch), so :mod:`surgery.detectors.builders`, :mod:`surgery.storage.trust`
and :mod:`surgery.yolo` can all import it (the way torchvision's ``_api.py`` keeps its registry
apart from the models).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Builder = Callable[..., Any]  # returns an nn.Module

# The project's own builders (``register_model``). Torchvision's builders are listed from
# torchvision itself (surgery.detectors.builders) so new releases show up without a code change.
_OWN_BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a detector builder under ``name``."""

    def deco(fn: Builder) -> Builder:
        if name in _OWN_BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _OWN_BUILDERS[name] = fn
        return fn

    return deco


def own_builders() -> dict[str, Builder]:
    """The builders registered with :func:`register_model` (name -> function)."""
    return _OWN_BUILDERS


@dataclass
class ModelSpec:
    """How to (re)build a detector: a registered name or ``module:function`` plus kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    # user-code builders: {"file": path, "sha256": hex} of the file that defines it (surgery.storage.trust)
    code: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "kwargs": copy.deepcopy(self.kwargs)}
        if self.code is not None:
            d["code"] = dict(self.code)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        code = d.get("code")
        return cls(name=str(d["name"]), kwargs=dict(d.get("kwargs") or {}), code=dict(code) if code else None)


# ``scheme:reference`` models (``ultralytics:yolov8n.yaml``): a resolver turns the spec into a builder
# (and may record what it resolved in ``spec.kwargs``). The reference is data, not an import path:
# these names are not user code (surgery.storage.trust); a resolver that reads a pickle checks trust itself.
# The scheme names are known here before their resolver module is imported (so the trust boundary
# tells ``ultralytics:x.yaml`` from ``package.module:function`` without importing torch); the
# resolver module attaches its resolver with ``register_scheme``.
_SCHEMES: dict[str, Callable[[ModelSpec], Builder] | None] = {"ultralytics": None}


def register_scheme(prefix: str, resolver: Callable[[ModelSpec], Builder]) -> None:
    """Let ``build_model`` accept ``prefix:reference`` names, resolved by ``resolver(spec)``."""
    if _SCHEMES.get(prefix) is not None:
        raise ValueError(f"model scheme {prefix!r} is already registered")
    _SCHEMES[prefix] = resolver


def scheme_of(name: str) -> str | None:
    """``"ultralytics"`` for ``ultralytics:yolov8n.yaml``; ``None`` for other names."""
    prefix = name.partition(":")[0]
    return prefix if ":" in name and prefix in _SCHEMES else None


def scheme_resolver(prefix: str) -> Callable[[ModelSpec], Builder]:
    resolver = _SCHEMES.get(prefix)
    if resolver is None:
        raise KeyError(f"model scheme {prefix!r} has no resolver registered")
    return resolver
