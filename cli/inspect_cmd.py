"""``surgery inspect``: the coupled channel groups of a detector, its params and MACs (with the
input size and RoI count they are counted at), nothing cut."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.report import fmt_count as _fmt

from .common import parse_kv, resolve_recipe
from .console import console
from .display import macs_line, working
from .table import FORMAT_HELP, Column, machine_readable, render


def inspect(
    model: str = typer.Option(None, "--model", "-m", help="Registered name, package.module:function, or a checkpoint."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe YAML file or shipped recipe name."),
    skip: list[str] = typer.Option(None, "--skip", help="LAYER_GLOB never cut (repeatable)."),
    kwarg: list[str] = typer.Option(None, "--kwarg", "-k", help="Builder argument KEY=VALUE (repeatable)."),
    layers: bool = typer.Option(False, "--layers", help="List every layer of every group."),
    macs_size: int = typer.Option(None, help="Input size for the MACs count (default: recipe bench.input_size)."),
    fmt: str = typer.Option("table", "--format", "-f", help=FORMAT_HELP),
) -> None:
    """Show the coupled channel groups and their widths without cutting anything."""
    from surgery.errors import RecipeError
    from surgery.measure import count_macs, count_params
    from surgery.pruning.prune import MACS_ROIS, inspect_model, is_two_stage
    from surgery.storage.checkpoint import resolve_model

    rec = resolve_recipe(recipe, {"prune.skip": list(skip) if skip else None})
    rec.model.kwargs.update(parse_kv(kwarg, "--kwarg"))
    source = model or rec.model.name
    if not source:
        raise RecipeError("no model: pass --model or a recipe with model.name")
    size = macs_size or rec.bench.input_size
    with working(f"tracing {source}", quiet=machine_readable(fmt)):
        net, _, _ = resolve_model(source, rec.model.kwargs, rec.model.weights)
        graph = inspect_model(net, skip=rec.prune.skip)
        counted, params = count_macs(net, size, rois=MACS_ROIS), count_params(net).total
    macs = counted.total
    join = ", ".join
    rows = [{"group": g.index, "root": g.root, "channels": g.channels,
             "producers": join(g.producers) if layers else len(g.producers),
             "consumers": join(g.consumers) if layers else len(g.consumers),
             "prunable": "yes" if g.prunable else f"no ({g.reason})"} for g in graph.groups]
    cols = [Column("group", justify="right"), Column("root", "root layer"), Column("channels", justify="right"),
            "producers", "consumers", "prunable"]
    rois = MACS_ROIS if is_two_stage(net) else None
    extra = {"model": source, "params": params, "macs": macs, "macs_input_size": size, "macs_rois": rois,
             "macs_network_input": counted.backbone_input,
             "output_layers": graph.output_layers}
    if machine_readable(fmt):
        render(rows, cols, fmt, extra=extra if fmt == "json" else None)
        return
    render(rows, cols, title=f"{source}: {len(graph.groups)} coupled channel groups")
    console.print(f"params {_fmt(params)}, {macs_line(macs, None, size, rois, counted.backbone_input)}", highlight=False, soft_wrap=True)
    console.print(f"output layers (never cut): {', '.join(graph.output_layers)}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
