"""``surgery info CKPT``: provenance, what was cut per stage (and per layer), metrics so far."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from .console import LINE_LIMIT, console, escape_control, plain, shown
from .table import FORMAT_HELP, Column, check_format, render

KEPT = Column("kept", justify="right", fmt=lambda v: f"{v:.0%}")


def info(
    checkpoint: Path = typer.Argument(..., help="A surgery checkpoint, or an .onnx file from export / quantize."),
    layers: bool = typer.Option(False, "--layers", help="Every cut layer, not only the stages."),
    show_recipe: bool = typer.Option(False, "--recipe", help="Print the recipe saved in the checkpoint."),
    fmt: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP + " csv: one row per layer."),
) -> None:
    """Where a checkpoint came from, what was cut (before -> after), and its recorded metrics."""
    from surgery.deployment.runtime import is_onnx
    from surgery.storage.info import describe_checkpoint

    check_format(fmt)
    if is_onnx(checkpoint):
        _onnx_info(checkpoint, fmt)
        return
    d = describe_checkpoint(checkpoint)
    layer_rows = [{"layer": c.layer, "before": c.before, "after": c.after, "kept": c.kept} for c in d.layers]
    if fmt == "json":
        typer.echo(json.dumps(d.to_dict(), indent=2, default=str))
        return
    if fmt == "csv":
        render(layer_rows, ["layer", "before", "after", "kept"], "csv")
        return
    p = lambda text: console.print(text, soft_wrap=True, highlight=False)  # noqa: E731
    # everything below from the checkpoint is data: shown() escapes control characters and markup
    p(f"[bold]{shown(checkpoint)}[/]: {shown(d.kind)}, builder [bold]{shown(d.builder)}[/] {shown(brief(d.kwargs))}")
    if d.code:
        p(f"  builder file {shown(d.code.get('file'))} (sha256 {shown(d.code.get('sha256'), 16)}...)")
    if d.created:
        p(f"  written {shown(d.created)}")
    names = d.class_names[1:] if d.class_names else None
    p(f"  classes: {shown(', '.join(plain(n, 120) for n in names), LINE_LIMIT)}" if names else "  classes: not recorded (labels are ids)")
    for i, step in enumerate(d.chain):
        p(f"  {'<-' if i else 'made by'} {shown(step.what)}" + (f" from {shown(step.source)}" if step.source else ""))
    if d.stages:
        rows = [{"stage": s.stage, "layers": s.layers, "before": s.before, "after": s.after,
                 "kept": s.after / s.before if s.before else 1.0} for s in d.stages]
        render(rows, ["stage", Column("layers", justify="right"), Column("before", "channels before", "right"),
                      Column("after", "channels after", "right"), KEPT], title="what was cut, per stage")
    if layers and layer_rows:
        render(layer_rows, ["layer", Column("before", justify="right"), Column("after", justify="right"), KEPT],
               title="per layer (output channels)")
    if d.metrics:
        rows = [{"metric": k, "value": f"{v:.4f}" if isinstance(v, float) else brief(v)} for k, v in d.metrics.items()]
        render(rows, ["metric", Column("value", justify="right")], title="metrics recorded")
    if d.history:
        p("evaluations during training: " + ", ".join(
            f"step {shown(h.get('step'), 20)}: mAP {_number(h.get('mAP')):.4f}" for h in d.history))
    if show_recipe and d.recipe:
        import yaml

        p(escape(escape_control(yaml.safe_dump(d.recipe, sort_keys=False), keep="\n")))


def brief(value: Any, depth: int = 0) -> str:
    """A recorded value (metrics, builder arguments) as one short line: nested containers are
    summarised, never recursed into without bound (a crafted 100000-deep dict is one line)."""
    if isinstance(value, dict):
        if depth >= 2:
            return f"{{{len(value)} keys}}"
        items = ", ".join(f"{plain(k, 40)}: {brief(v, depth + 1)}" for k, v in list(value.items())[:12])
        return "{" + items + (", …}" if len(value) > 12 else "}")
    if isinstance(value, (list, tuple)):
        if depth >= 2:
            return f"[{len(value)} items]"
        return "[" + ", ".join(brief(v, depth + 1) for v in list(value)[:12]) + (", …]" if len(value) > 12 else "]")
    return plain(repr(value) if isinstance(value, str) and depth else value, 80)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def _onnx_info(path: Path, fmt: str) -> None:
    from surgery.report import fmt_count
    from surgery.storage.info import describe_onnx

    d = describe_onnx(path)
    if fmt == "json":
        typer.echo(json.dumps(d.to_dict(), indent=2, default=str))
        return
    if fmt == "csv":
        render([{"key": k, "value": v} for k, v in d.metadata.items()], ["key", "value"], "csv")
        return
    extra = {k: v for k, v in d.metadata.items() if k in ("calibration", "activations", "weights", "float_source", "source", "method", "ratio")}
    rows = [
        {"what": "model", "value": f"{d.model} ({d.kind})"},
        {"what": "precision", "value": d.precision},
        {"what": "classes", "value": ", ".join(plain(n, 60) for n in d.class_names[1:]) if d.class_names else "not recorded (labels are ids)"},
        {"what": "input", "value": f"image [{', '.join(str(x) for x in d.input_shape)}] in [0, 1]"},
        {"what": "outputs", "value": ", ".join(d.outputs)},
        {"what": "params", "value": fmt_count(d.params) if d.params is not None else "-"},
        {"what": "MACs", "value": (f"{fmt_count(d.macs)} (one {d.metadata.get('input_size', '?')}px image)"
                                   if d.macs is not None else "-")},
        *({"what": k, "value": v} for k, v in extra.items() if v),
    ]
    render(rows, ["what", "value"], title=f"{path} (ONNX)")


def register(app: typer.Typer) -> None:
    app.command("info")(info)
