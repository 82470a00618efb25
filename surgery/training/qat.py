"""Quantization-aware training: fine-tune with fake-quantized convolutions through the trainer.

:class:`QATHook` makes every ``nn.Conv*d`` / ``nn.Linear`` outside the output layers compute with
fake-quantized weights (per output channel, symmetric int8 in [-127, 127]: what ONNX Runtime's
per-channel QDQ weights are) and fake-quantized inputs (per tensor, asymmetric uint8, ranges from
a moving-average min/max observer, as ORT's U8 activations), with straight-through gradients. It
replaces the layers' ``forward`` on the instance only: no parameter or buffer is renamed or added,
so masks (:class:`~surgery.training.hooks.MaskHook`), feature imitation, DDP, ``--resume`` and the saved
state dict all see the plain float model. The observed ranges are the hook's state: saved in the
checkpoint's training state (and restored by ``--resume``), read back by :func:`qat_ranges` when
:func:`surgery.deployment.quantize.quantize_checkpoint` hands them to ORT as ``TensorQuantOverrides``.

Why not torch's own QAT toolchains: eager-mode ``torch.ao.quantization`` needs QuantStub /
DeQuantStub placed around every quantized region and conv-bn-relu fusion, i.e. rewriting the
forward of torchvision's backbones, FPNs and heads, whose control flow (image lists, per-level
loops, anchor matching) sits between the layers; FX (``prepare_qat_fx``) and PT2E
(``prepare_qat_pt2e``) need one traceable / exportable graph, and a detector is not: on
``fcos_resnet18_slim`` ``torch.fx.symbolic_trace`` fails ("Proxy object cannot be iterated", the
loop over the image list) and ``torch.export`` fails on the data-dependent number of candidates
after score thresholding (``GuardOnDataDependentSymNode``). NNCF is not installed here and wraps
the model too. Fake-quantizing the layers themselves works on any detector that trains, and the
deployment quantizer stays ORT's (the same as post-training quantization).
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..pruning.graph import output_layers
from .hooks import HookBase

if TYPE_CHECKING:
    from ..storage.checkpoint import Checkpoint
    from .train import Trainer

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
HOOK_KEY = "QATHook"


class _FakeQuant:
    """A layer's input observer and fake quantizers (plain attributes: nothing in the state dict)."""

    def __init__(self, momentum: float, lo: float | None = None, hi: float | None = None) -> None:
        self.momentum = momentum
        self.lo = None if lo is None else torch.tensor(float(lo))
        self.hi = None if hi is None else torch.tensor(float(hi))

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo.to(lo.device) + self.momentum * (lo - self.lo.to(lo.device))
            self.hi = self.hi.to(hi.device) + self.momentum * (hi - self.hi.to(hi.device))

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        assert self.lo is not None and self.hi is not None
        lo = torch.clamp(self.lo.to(x.device), max=0.0)
        hi = torch.clamp(self.hi.to(x.device), min=0.0)
        scale = torch.clamp((hi - lo) / 255.0, min=1e-8).float().reshape(1)
        zero = torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.int32).reshape(1)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)

    @staticmethod
    def weight(w: torch.Tensor) -> torch.Tensor:
        scale = torch.clamp(w.detach().abs().flatten(1).amax(dim=1) / 127.0, min=1e-8).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)


def _fake_quant_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fq: _FakeQuant = self._surgery_fq
    if self.training or fq.lo is None:
        fq.observe(x)
    w = _FakeQuant.weight(self.weight)
    x = fq.activation(x)
    if isinstance(self, nn.Linear):
        return F.linear(x, w, self.bias)
    return self._conv_forward(x, w, self.bias)


def quantizable_layers(model: nn.Module, skip: Sequence[str] = ()) -> list[str]:
    """The convolution and linear layers QAT fake-quantizes: all but the output layers and ``skip``."""
    excluded = set(output_layers(model)) | set(skip)
    return [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES) and n not in excluded]


class QATHook(HookBase):
    """Fake-quantize the model's convolutions and linear layers while it trains (see the module
    docstring). ``momentum``: the observers' moving-average factor. ``skip``: more layers to
    keep in float (the output layers always are)."""

    def __init__(self, momentum: float = 0.01, skip: Sequence[str] = ()) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.skip = list(skip)
        self.layers: list[str] = []
        self._fq: dict[str, _FakeQuant] = {}
        self._restored: dict[str, list[float]] = {}
        self._model: nn.Module | None = None

    def before_train(self, trainer: Trainer) -> None:
        self.install(trainer.module)

    def install(self, model: nn.Module) -> None:
        """Make the layers fake-quantize (observers start from the restored ranges, if any)."""
        self.remove()
        self.layers = quantizable_layers(model, self.skip)
        for name in self.layers:
            m = model.get_submodule(name)
            r = self._restored.get(name)
            fq = _FakeQuant(self.momentum, *(r if r else (None, None)))
            self._fq[name] = fq
            m._surgery_fq = fq
            m.forward = types.MethodType(_fake_quant_forward, m)
        self._model = model

    def remove(self) -> None:
        """Give the layers back their float ``forward`` (the ranges stay in :meth:`ranges`)."""
        if self._model is None:
            return
        for name in self.layers:
            m = self._model.get_submodule(name)
            for attr in ("forward", "_surgery_fq"):
                if attr in m.__dict__:
                    delattr(m, attr)
        self._restored = self.ranges()
        self._model = None

    def ranges(self) -> dict[str, list[float]]:
        """``{layer: [min, max]}`` of each observed layer input."""
        if self._model is None:
            return dict(self._restored)
        return {n: [float(fq.lo), float(fq.hi)] for n, fq in self._fq.items() if fq.lo is not None and fq.hi is not None}

    def after_train(self, trainer: Trainer) -> None:
        self.remove()

    def on_divergence(self, trainer: Trainer) -> None:
        self.remove()

    def state_dict(self) -> dict[str, Any]:
        return {"ranges": self.ranges(), "momentum": self.momentum, "skip": list(self.skip),
                "weights": "int8 per-channel symmetric", "activations": "uint8 per-tensor asymmetric"}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = {str(k): [float(v[0]), float(v[1])] for k, v in (state.get("ranges") or {}).items()}


def qat_ranges(ckpt: Checkpoint) -> dict[str, tuple[float, float]] | None:
    """The activation ranges a QAT run recorded in ``ckpt`` (``None``: not QAT-trained). A later
    training run without QAT replaces the training state, so its checkpoint reads as not QAT."""
    hooks = (ckpt.train_state or {}).get("hooks") or {}
    for key, state in hooks.items():
        if str(key).split(":")[0] == HOOK_KEY and isinstance(state, dict) and state.get("ranges"):
            return {str(k): (float(v[0]), float(v[1])) for k, v in state["ranges"].items()}
    return None


__all__ = ["QATHook", "qat_ranges", "quantizable_layers"]
