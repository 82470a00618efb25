"""``surgery compress``: search for the cut that meets a goal, retrain it, deliver it."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from .common import resolve_recipe
from .console import console, err_console

GOAL_HELP = "Goal: give an accuracy floor (--keep-map / --min-map) and/or a budget (--keep-macs / --keep-latency)."


def parse_duration(text: str | None) -> float | None:
    """``30m``, ``2h``, ``90s`` or plain seconds -> seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if m is None:
        raise typer.BadParameter(f"{text!r}: expected a duration such as 90s, 30m or 2h", param_hint="--time")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _csv(text: str, cast: type, flag: str) -> tuple:
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected a comma-separated list", param_hint=flag) from None


def compress(
    model: Path = typer.Argument(..., help="The dense checkpoint (written by `surgery train`)."),
    data: str = typer.Option(None, "--data", help="synthetic | coco:ROOT | voc:ROOT | a COCO .json (default: the checkpoint's)."),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="Recipe (retrain section, prune defaults); flags override it."),
    keep_map: float = typer.Option(None, "--keep-map", help="Accuracy floor: fraction of the dense mAP kept (0.99). " + GOAL_HELP),
    min_map: float = typer.Option(None, "--min-map", help="Accuracy floor: an absolute mAP@[.5:.95] (0.3)."),
    keep_macs: float = typer.Option(None, "--keep-macs", help="Budget: fraction of the dense MACs kept (0.5)."),
    keep_latency: float = typer.Option(None, "--keep-latency", help="Budget: fraction of the dense network latency kept on --runtime."),
    runtime: str = typer.Option("onnxruntime", "--runtime", help="--keep-latency: onnxruntime | torch."),
    int8: bool = typer.Option(False, "--int8", help="Also write the INT8 ONNX of the result."),
    trials: int = typer.Option(30, "--trials", help="Finished trials the study stops at (all workers together)."),
    time_limit: str = typer.Option(None, "--time", help="Stop this worker's search after this long (90s, 30m, 2h)."),
    storage: str = typer.Option(None, "--storage", help="Study storage URL (postgresql://...) shared by workers on several machines (default: SQLite in --out)."),
    study: str = typer.Option("compress", "--study", help="Study name within the storage."),
    out: Path = typer.Option(Path("runs/compress"), "--out", "-o", help="Run folder (re-running resumes its study)."),
    recover: int = typer.Option(16, "--recover", help="Recovery batches (8 images) after each trial's cut."),
    holdout: int = typer.Option(64, "--holdout", help="Held-out training images the proxy mAP is scored on."),
    criteria: str = typer.Option("l1,l2,bn", "--criteria", help="Ranking criteria searched (comma-separated)."),
    round_to: str = typer.Option("8", "--round-to", help="Width roundings searched (comma-separated; 1,8 also tries exact widths, which run slower for the same MACs)."),
    multiplier: str = typer.Option("0.5,1.5", "--multiplier", help="LO,HI: range of the per-stage multipliers of the cut searched (0.25,2.0: a wider space)."),
    max_stages: int = typer.Option(8, "--max-stages", help="At most this many stages, one multiplier each (groups sharing a name prefix; more: a finer allocation)."),
    sensitivity: str = typer.Option(None, "--sensitivity", help="Per-group multipliers searched too, from a sensitivity table: label-free (measured first on the dense model's own detections on held-out training images, no annotation read; the default without --storage), a CSV from `surgery sensitivity` (with --storage give every machine the same CSV: the default there is none), or none."),
    input_size: int = typer.Option(None, "--input-size", help="Image side MACs and latency are measured at (default: recipe bench.input_size)."),
    retrain_steps: int = typer.Option(None, "--retrain-steps", help="Retraining steps of the chosen trial (default: the recipe's retrain.steps)."),
    workers: int = typer.Option(1, "--workers", help="Processes on this machine searching together (torch threads split between them; 2 on 2 cores: about twice the trials)."),
    search_only: bool = typer.Option(False, "--search-only", help="Only run trials (extra workers): no retraining, no files but the study."),
    seed: int = typer.Option(0, "--seed", help="Sampler seed (each worker adds its process id)."),
) -> None:
    """Search for the fastest detector above an mAP floor, or the most accurate within a budget; retrain it
    and write the checkpoint, ONNX and a report (Pareto front, every trial, goal met or not)."""
    from surgery.compress import (
        Goal,
        SearchSettings,
        SearchSpace,
        deliver,
        resolve_sensitivity,
        search,
        write_report,
    )
    from surgery.errors import RecipeError
    from surgery.storage.checkpoint import read_checkpoint
    from surgery.workflows import recipe_for_checkpoint

    goal = Goal(keep_map=keep_map, min_map=min_map, keep_macs=keep_macs, keep_latency=keep_latency, runtime=runtime,
                int8=int8)
    goal.validate()
    if trials < 1:
        raise RecipeError("--trials must be >= 1")
    if workers < 1:
        raise RecipeError("--workers must be >= 1")
    written = {(out / name).resolve() for name in ("model.pt", "pruned.pt", "trials.csv", "report.md")}
    if model.resolve() in written:
        raise RecipeError(f"{model} is one of the files compress writes in --out {out}: pass another --out")
    ckpt = read_checkpoint(model)
    rec = (resolve_recipe(recipe, {}) if recipe is not None else recipe_for_checkpoint(ckpt, None, {}))
    rec = resolve_recipe_flags(rec, data, retrain_steps)
    settings = SearchSettings(trials=trials, seconds=parse_duration(time_limit), recover_batches=recover, holdout=holdout,
                              macs_input_size=input_size or rec.bench.input_size, seed=seed, study_name=study,
                              workers=workers)
    mult = _csv(multiplier, float, "--multiplier")
    if len(mult) != 2:
        raise typer.BadParameter(f"{multiplier!r}: expected LO,HI (two numbers)", param_hint="--multiplier")
    space = SearchSpace(criteria=_csv(criteria, str, "--criteria"), round_to=_csv(round_to, int, "--round-to"),
                        multiplier=(mult[0], mult[1]), max_stages=max_stages,
                        sensitivity=_sensitivity(sensitivity, storage))
    space.validate()
    from surgery.storage.checkpoint import load_checkpoint
    from surgery.workflows import Callbacks

    dense, _ = load_checkpoint(model)
    cb = Callbacks(on_note=_line, on_stage=lambda s: _line(f"[{s}]"), on_warning=lambda s: _line(f"warning: {s}"))
    _line(f"goal: {goal.describe()}")
    if space.sensitivity is not None:
        cb.stage(f"sensitivity table ({space.sensitivity})")
        space = resolve_sensitivity(space, dense, rec, out, settings.macs_input_size)
    result = search(dense, rec, goal, out, space=space, settings=settings, storage=storage, callbacks=cb)
    if search_only:
        _line(f"this worker ran trials {', '.join(map(str, result.ran)) or 'none'}; the study holds "
              f"{len(result.complete)} finished trials")
        return
    delivery = None
    if result.met:
        delivery = deliver(model, rec, result, out, settings=settings, space=space, callbacks=cb)
    files = write_report(result, delivery, out)
    _line(f"report: {files['report']}, {files['csv']}, {files['plot']}")
    if not result.met:
        _fail(f"goal not met: {result.miss}")
    if delivery is not None:
        _line(f"validation mAP {delivery.val_map:.4f} (dense {delivery.dense_val_map:.4f}); wrote {delivery.checkpoint}"
              + "".join(f", {p}" for p in (delivery.onnx, delivery.int8, delivery.ultralytics) if p is not None))
        for note in delivery.notes:
            _line(note)
        if not delivery.met:
            _fail(f"goal not met on the validation split: {delivery.miss}")
        _line("goal met on the validation split")


def _sensitivity(value: str | None, storage: str | None) -> str | None:
    """``--sensitivity``: the label-free table by default (+3.8 points of proxy mAP over the uniform cut
    on the quickstart at half the MACs, against +1.6 without; docs/benchmarks/compress.md). With
    ``--storage`` the workers may run on other machines, each of which would measure its own table
    (deterministic on one machine only), so none is the default there."""
    if value is None:
        return None if storage else "label-free"
    return None if value.lower() == "none" else value


def resolve_recipe_flags(rec, data: str | None, retrain_steps: int | None):  # noqa: ANN001, ANN201 - Recipe
    from surgery.config.recipe import apply_overrides, check_flag_overrides

    overrides = {"data.source": data, "retrain.steps": retrain_steps}
    check_flag_overrides(overrides)
    return apply_overrides(rec, overrides)


def _line(text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _fail(text: str) -> None:
    err_console.print(text, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("compress")(compress)
