"""``surgery prune``."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.pruning.importance import method_help
from surgery.report import fmt_count as _fmt

from .common import parse_kv, parse_ratios, resolve_recipe
from .console import console
from .display import macs_line, working
from .recover_cmd import reconstruct_line
from .table import Column, render

RECOVER_HELP = ("Recovery without retraining after the cut: N calibration batches (8 images each) from --data; "
                "least-squares re-fit against the dense model + BatchNorm re-estimation (0: off).")
ALLOCATION_HELP = "uniform | global | sensitivity (per-group ratios from --sensitivity CSV meeting --keep-macs)."


def prune(
    model: str = typer.Option(None, "--model", "-m", help="Registered name, package.module:function, or a checkpoint."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe YAML file or shipped recipe name (`surgery recipes`); flags override its values."),
    ratio: float = typer.Option(None, "--cut-ratio", "--ratio", help="Fraction of channels CUT in every coupled group (0 < r < 1)."),
    method: str = typer.Option(None, help=method_help()),
    global_ranking: bool = typer.Option(None, "--global/--uniform", help="Rank channels across all groups."),
    round_to: int = typer.Option(None, help="Round kept widths up to a multiple of this (8, 16)."),
    min_channels: int = typer.Option(None, help="Never keep fewer channels in a group."),
    override: list[str] = typer.Option(None, "--override", help="LAYER_GLOB=RATIO (repeatable)."),
    skip: list[str] = typer.Option(None, "--skip", help="LAYER_GLOB never cut (repeatable)."),
    keep_head: bool = typer.Option(None, "--keep-head/--cut-head", help="Keep the detection head's own widths (YOLO: the Detect branches); the MACs target is met by cutting the rest more."),
    anchors: str = typer.Option(None, help="Keep only these anchor shapes: 'ratios=1.0;sizes=0,1'."),
    target_macs: float = typer.Option(
        None, "--keep-macs", "--target-macs", help="Fraction of the dense MACs KEPT (0.5): the cut ratio is searched."
    ),
    target_params: float = typer.Option(
        None, "--keep-params", "--target-params", help="Fraction of the parameters KEPT: the cut ratio is searched."
    ),
    calib_batches: int = typer.Option(None, help="taylor/fisher: calibration batches from --data (default 4)."),
    data: str = typer.Option(None, "--data", help="Calibration data for taylor/fisher: synthetic | coco:ROOT | voc:ROOT | yolo:DATA_YAML | a COCO .json."),
    target_latency: float = typer.Option(None, "--keep-latency", "--target-latency", help="Fraction of the dense network latency KEPT on --runtime (0.5): per-group widths from a measured latency table."),
    runtime: str = typer.Option(None, help="--keep-latency: onnxruntime | openvino | torch (where the latency table is measured)."),
    latency_device: str = typer.Option(None, "--latency-device", help="--keep-latency --runtime torch: cpu | cuda (the table and its check on the GPU, CUDA graphs)."),
    recover: int = typer.Option(None, "--recover", help=RECOVER_HELP),
    recover_method: str = typer.Option(None, "--recover-method", help="refit (least squares + BatchNorm) | reconstruct (then Adam steps matching the dense model's head outputs; images only)."),
    allocation: str = typer.Option(None, "--allocation", help=ALLOCATION_HELP),
    sensitivity: Path = typer.Option(None, "--sensitivity", help="CSV from `surgery sensitivity` (--allocation sensitivity), or label-free: measure the checkpoint's table now, scored against its own detections."),
    sparsity: float = typer.Option(None, help="Masked pruning: fraction of conv/linear weights ZEROED (shapes kept)."),
    scope: str = typer.Option(None, help="Masked pruning: layer | global."),
    weights: str = typer.Option(None, help="torchvision weights name (DEFAULT) or a local weights file."),
    kwarg: list[str] = typer.Option(None, "--kwarg", "-k", help="Builder argument KEY=VALUE (repeatable)."),
    macs_size: int = typer.Option(None, help="Input size for the MACs count (default: recipe bench.input_size)."),
    out: Path = typer.Option(Path("pruned.pt"), "--out", "-o", help="Where to write the pruned checkpoint."),
) -> None:
    """Cut channels (or mask weights) of a detector and save a checkpoint that reloads without code."""
    from surgery.detectors.anchors import parse_anchor_spec
    from surgery.errors import RecipeError
    from surgery.workflows import prune_and_save

    overrides = {
        "prune.ratio": ratio,
        "prune.method": method,
        "prune.global_ranking": global_ranking,
        "prune.round_to": round_to,
        "prune.min_channels": min_channels,
        "prune.overrides": parse_ratios(override, "--override"),
        "prune.skip": list(skip) if skip else None,
        "prune.keep_head": keep_head,
        "prune.anchors": parse_anchor_spec(anchors),
        "prune.sparsity": sparsity,
        "prune.scope": scope,
        "prune.target_macs": target_macs,
        "prune.target_params": target_params,
        "prune.target_latency": target_latency,
        "prune.runtime": runtime,
        "prune.latency_device": latency_device,
        "prune.calib_batches": calib_batches,
        "prune.recover": recover,
        "prune.recover_method": recover_method,
        "prune.allocation": allocation,
        "prune.sensitivity": str(sensitivity) if sensitivity is not None else None,
        "data.source": data,
        "model.weights": weights,
    }
    rec = resolve_recipe(recipe, overrides)
    if kwarg:
        rec.model.kwargs.update(parse_kv(kwarg, "--kwarg"))
    source = model or rec.model.name
    if not source:
        raise RecipeError("no model: pass --model or a recipe with model.name")
    # the prune settings given as flags, as spelled: surgery.pruning.budget refuses what they would not change
    given = {key.split(".", 1)[1]: FLAGS[key] for key, value in overrides.items() if value is not None and key in FLAGS}
    if macs_size is not None:
        given["macs_input_size"] = "--macs-size"
    with working(f"pruning {source} (tracing, ranking, cutting)"):
        outcome = prune_and_save(source, rec, out, given=given,
                                 macs_input_size=macs_size if macs_size is not None else rec.bench.input_size)
    if outcome.masked is not None:
        m = outcome.masked
        console.print(
            f"masked {source}: {m.sparsity:.0%} of conv/linear weights zeroed ({m.scope}); "
            f"params {_fmt(m.total_params)} (unchanged), non-zero {_fmt(m.nonzeros_before)} -> {_fmt(m.nonzeros_after)}"
        )
    else:
        _print_report(source, outcome.structured.report)
        if outcome.allocation is not None:
            _print_allocation(outcome.allocation, rec)
        if outcome.recovery is not None:
            _print_recovery(outcome.recovery)
    console.print(f"saved [bold]{outcome.path}[/] (kind: {outcome.kind})")


FLAGS = {
    "prune.ratio": "--cut-ratio", "prune.method": "--method", "prune.global_ranking": "--global/--uniform",
    "prune.round_to": "--round-to", "prune.min_channels": "--min-channels", "prune.overrides": "--override",
    "prune.skip": "--skip", "prune.keep_head": "--keep-head", "prune.anchors": "--anchors", "prune.sparsity": "--sparsity", "prune.scope": "--scope",
    "prune.target_macs": "--keep-macs", "prune.target_params": "--keep-params", "prune.target_latency": "--keep-latency",
    "prune.runtime": "--runtime", "prune.latency_device": "--latency-device", "prune.calib_batches": "--calib-batches", "prune.recover": "--recover",
    "prune.allocation": "--allocation", "prune.sensitivity": "--sensitivity",
}


def _print_allocation(a, rec) -> None:  # noqa: ANN001 - sensitivity.SensitivityAllocation, Recipe
    console.print(f"allocation by sensitivity ({rec.prune.sensitivity}): {len(a.ratios)} groups cut, MACs kept "
                  f"{a.measured_macs_ratio:.1%} (target {rec.prune.target_macs:.1%}, table estimate "
                  f"{a.estimated_macs_ratio:.1%})" + ("" if a.met else " [yellow]target not met[/]"), soft_wrap=True)
    for note in a.notes:
        console.print(f"[yellow]{note}[/]", soft_wrap=True)


def _print_report(source: str, report) -> None:  # noqa: ANN001 - PruneReport
    rows = [{"group": g.index, "root": g.root, "layers": len(g.layers), "channels": g.channels_before,
             "kept": g.channels_after if g.prunable else f"({g.reason})"} for g in report.groups]
    how = "global" if report.global_ranking else "uniform"
    render(rows, [Column("group", justify="right"), Column("root", "root layer"), Column("layers", justify="right"),
                  Column("channels", justify="right"), "kept"], title=f"{source}: {report.method} ratio {report.ratio} ({how})")
    macs = (macs_line(report.macs_before, report.macs_after, report.macs_input_size, report.macs_rois,
                      report.macs_network_input) if report.macs_ratio is not None else None)
    console.print(f"params {_fmt(report.params_before)} -> {_fmt(report.params_after)} ({report.params_ratio:.0%} kept)"
                  + (f", {macs}" if macs else ""), highlight=False, soft_wrap=True)
    console.print(f"output layers kept whole: {', '.join(report.output_layers)}\n"
                  f"analysis {report.seconds_analysis:.2f}s, cut {report.seconds_cut:.2f}s", soft_wrap=True)
    if report.target is not None and hasattr(report.target, "table_key"):  # surgery.pruning.latency.LatencyTargetResult
        t = report.target
        measured = "not timed" if t.measured is None else (f"measured {t.measured:.1%} (median of interleaved passes; "
                                                            f"{t.measured_ms:.2f} / {t.dense_ms:.2f} ms)")
        warn = "" if t.within_tolerance else f"; [yellow]not within {t.tol:.0%}[/]"
        console.print(f"target {t.target:.1%} of the dense network latency on {t.runtime}: {measured}{warn}", soft_wrap=True)
        for note in t.notes:
            console.print(f"  {note}", highlight=False, soft_wrap=True)
    elif report.target is not None:
        t = report.target
        line = f"target {t.target:.1%} of the {'MACs' if t.target_macs is not None else 'params'}: ratio {t.ratio:.4f}"
        console.print(f"{line}, achieved {t.achieved:.1%}" + (f"; [yellow]{t.note}[/]" if t.note else ""))
    if report.anchors:
        for gen in report.anchors["generators"]:
            after = [len(k) for k in gen["keep"]]
            console.print(f"anchors {gen['path']}: per level {gen['before']} -> {after}")


def _print_recovery(rec) -> None:  # noqa: ANN001 - surgery.pruning.recover.RecoveryResult
    s = rec.summary()
    err = (f"; reconstruction error (relative, mean over layers) {s['mean_error_before']:.3f} -> {s['mean_error_after']:.3f}"
           if s["mean_error_before"] is not None else "")
    console.print(f"recovered on {rec.images} images ({rec.batches} batches): {s['layers_refit']} layers re-fit by least "
                  f"squares, {s['bn_reestimated']} BatchNorm layers re-estimated{err}, {rec.seconds:.1f}s", soft_wrap=True)
    if s.get("method") == "reconstruct":
        console.print(reconstruct_line(rec), soft_wrap=True, highlight=False)
    if rec.frozen_norms:
        console.print(f"{len(rec.frozen_norms)} FrozenBatchNorm2d layers kept as they are (the convs before them are re-fit "
                      "to the dense pre-norm outputs)", soft_wrap=True)
    for name, why in rec.skipped.items():
        console.print(f"not re-fit: {name}: {why}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("prune")(prune)
