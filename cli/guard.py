"""The guard every command that loads a model, checkpoint or recipe runs in: the ``--trust-code``
option (a trust context for that call), outputs checked before any work starts, inputs protected
from being overwritten."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path
from typing import Any

import typer

from surgery.errors import RecipeError
from surgery.recipe import load_recipe

# commands that load a model, a checkpoint or a recipe
TRUST_COMMANDS = ("prune", "inspect", "train", "retrain", "eval", "bench", "export", "sweep", "quantize", "predict", "info")
# parameters naming input files, and output files (-> the flag shown in errors)
INPUT_PARAMS = ("model", "recipe", "ckpt", "checkpoint", "checkpoints", "weights", "images")
OUTPUT_PARAMS = {"out": "--out", "json_out": "--json", "csv": "--csv", "detections": "--detections",
                 "keep_float": "--keep-float"}
FOLDER_OUTPUTS = ("sweep", "predict")  # their --out is a folder

TRUST_HELP = (
    "Allow the checkpoint / recipe / --model to run user code (a 'module:function' or 'file.py:function' "
    "builder) for this call. Without it only registered builders run."
)


def _inputs(bound: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for name in INPUT_PARAMS:
        v = bound.get(name)
        if isinstance(v, (list, tuple)):
            out.extend(v)
        elif v is not None:
            out.append(v)
    return out


def _precheck(command: str, bound: dict[str, Any]) -> None:
    """Before any work: outputs are writable and are not inputs; --kwarg is not given with a checkpoint."""
    from surgery.checkpoint import looks_like_path
    from surgery.safety import OutputError, check_folder, check_output
    from surgery.validate import check_device

    inputs = _inputs(bound)
    check_device(bound.get("device"))
    if command == "export":
        size, opset = bound.get("input_size"), bound.get("opset")
        if size is not None and not 32 <= size <= 4096:
            raise RecipeError(f"--input-size {size}: expected an integer in [32, 4096]")
        if opset is not None and not 7 <= opset <= 30:
            raise RecipeError(f"--opset {opset}: expected an ONNX opset in [7, 30] (17 is well supported)")
    if bound.get("kwarg") and isinstance(bound.get("model"), str) and ":" not in bound["model"] and looks_like_path(bound["model"]):
        raise RecipeError(
            f"--kwarg does not apply to checkpoint {bound['model']}: it records its own builder arguments"
        )
    outputs = {flag: bound.get(name) for name, flag in OUTPUT_PARAMS.items() if bound.get(name) is not None}
    if command == "export" and bound.get("out") is None and bound.get("checkpoint") is not None:
        outputs["--out (default)"] = Path(bound["checkpoint"]).with_suffix(".onnx")
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if command in FOLDER_OUTPUTS and flag == "--out":
            check_folder(path, what="--out")
        else:
            check_output(path, inputs=inputs, what=flag)
        key = os.path.realpath(os.path.abspath(os.fspath(path)))
        if key in seen:  # e.g. quantize --out k.onnx --keep-float k.onnx: one would replace the other
            raise OutputError(f"{flag} {path} and {seen[key]} are the same file; give each output its own path")
        seen[key] = f"{flag} {path}"


def _file_outputs(command: str, bound: dict[str, Any]) -> list[tuple[str, Path]]:
    """The output files this call writes (the folders of sweep/predict are locked by those commands)."""
    out = [(flag, Path(bound[name])) for name, flag in OUTPUT_PARAMS.items() if bound.get(name) is not None]
    if command == "export" and bound.get("out") is None and bound.get("checkpoint") is not None:
        out.append(("--out", Path(bound["checkpoint"]).with_suffix(".onnx")))
    return [(f, p) for f, p in out if not (command in FOLDER_OUTPUTS and f == "--out")]


def _locks(command: str, bound: dict[str, Any]) -> contextlib.ExitStack:
    """One lock per output file for the whole call: a second process writing the same file refuses
    (two ``train --out same.pt`` would interleave their metrics and keep one run's weights). Under
    torchrun only rank 0 writes, so only it locks."""
    from surgery.safety import OutputLock  # surgery loads after parsing: `--help` stays fast

    stack = contextlib.ExitStack()
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return stack
    try:
        for flag, path in _file_outputs(command, bound):
            stack.enter_context(OutputLock(path, what=flag))
    except BaseException:
        stack.close()
        raise
    return stack


def _refuse_untrusted_early(model: Any, recipe: Any) -> None:
    """Before datasets are built or anything trains: a --model, a recipe's model.name or its
    model.weights checkpoint that names user code is refused now (the same check the loader does)."""
    from surgery.checkpoint import looks_like_path, read_checkpoint
    from surgery.trust import is_user_code, origin, refuse

    def check_checkpoint(path: Any, label: str) -> None:
        if isinstance(path, (str, Path)) and ":" not in str(path) and looks_like_path(str(path)) and Path(path).is_file():
            spec = read_checkpoint(path).spec
            if is_user_code(spec.name):
                with origin(f"{label} {path}"):
                    raise refuse(spec.name, spec.kwargs)

    if isinstance(model, str) and is_user_code(model):
        with origin("--model"):
            raise refuse(model)
    check_checkpoint(model, "checkpoint")
    if recipe is not None and model is None:
        rec = load_recipe(recipe)
        if is_user_code(rec.model.name):
            with origin(f"recipe {recipe}"):
                raise refuse(rec.model.name, rec.model.kwargs)
        check_checkpoint(rec.model.weights, f"recipe {recipe}: model.weights checkpoint")


def guard(command: str, fn: Any) -> Any:
    """``fn`` with a ``--trust-code`` option; it runs in a trust context for that call, with its
    input files protected from being overwritten and its outputs checked up front."""
    sig = inspect.signature(fn, eval_str=True)
    if "trust_code" in sig.parameters:
        return fn
    extra = inspect.Parameter(
        "trust_code", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--trust-code", help=TRUST_HELP),
    )  # fmt: skip
    params = list(sig.parameters.values())
    new_sig = sig.replace(parameters=[*params, extra])

    @functools.wraps(fn)
    def wrapper(*args: Any, trust_code: bool = False, **kwargs: Any) -> Any:
        from surgery.safety import protecting
        from surgery.trust import origin, trusting

        bound = sig.bind_partial(*args, **kwargs).arguments
        _precheck(command, bound)
        model, recipe = bound.get("model"), bound.get("recipe")
        where = "--model" if isinstance(model, str) and ":" in model else f"recipe {recipe}" if recipe and not model else None
        with _locks(command, bound), trusting(trust_code), origin(where), \
                protecting(p for p in _inputs(bound) if isinstance(p, (str, Path))):  # fmt: skip
            if not trust_code:
                _refuse_untrusted_early(model, recipe)
            return fn(*args, **kwargs)

    wrapper.__signature__ = new_sig  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "trust_code": bool}
    return wrapper


def guard_commands(app: typer.Typer) -> None:
    """Apply :func:`guard` to every registered command in :data:`TRUST_COMMANDS`."""
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__ if info.callback else None)
        if name in TRUST_COMMANDS and info.callback is not None:
            info.callback = guard(name, info.callback)
