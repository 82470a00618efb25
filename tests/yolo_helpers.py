"""What the Ultralytics tests share (test_yolo.py, test_yolo_nms_free.py): two letterboxed images
with targets, one SGD step, and a cut through the CLI."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from surgery.detectors.builders import ModelSpec, build_model
from surgery.measure import count_params
from surgery.storage.checkpoint import load

SIZE = 128


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, 96, 128, generator=g), torch.rand(3, 128, 112, generator=g)]


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[20.0, 30.0, 90.0, 100.0], [5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([2, 4])},
    ]


def train_step(model: nn.Module) -> dict[str, float]:
    """One SGD step on :func:`images`; the loss terms by name (the total must be finite)."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = model(images(), targets())
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {k: float(v) for k, v in losses.items()}


def prune_with_cli(yaml: str, tmp_path: Path) -> tuple[nn.Module, nn.Module, Path]:
    """``surgery prune --ratio 0.5`` on ``ultralytics:<yaml>`` (nc 4, SIZE px): ``(dense, cut, file)``;
    the cut model, reloaded from its file, has under half the dense parameters."""
    out = tmp_path / "pruned.pt"
    res = CliRunner().invoke(
        app, ["prune", "--model", f"ultralytics:{yaml}", "-k", "nc=4", "-k", f"size={SIZE}", "--ratio", "0.5",
              "--macs-size", str(SIZE), "--out", str(out)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    dense = build_model(ModelSpec(f"ultralytics:{yaml}", {"nc": 4, "size": SIZE}))
    model = load(out)  # torch.load(weights_only=True) inside
    assert count_params(model).total < 0.5 * count_params(dense).total
    return dense, model, out
