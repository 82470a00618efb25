"""The guard every command that loads a model, checkpoint or recipe runs in: the ``--trust-code``
option (a trust context for that call), outputs checked before any work starts, inputs protected
from being overwritten; and the ``--max-model-gb`` option of every command that builds a model (a
model-size limit for that call)."""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path
from typing import Any

import typer

from surgery.config.recipe import load_recipe
from surgery.errors import RecipeError
from surgery.yolo.config_check import model_size_limit  # torch-free: reads Python data only

from .outputs import OUTPUT_PARAMS, OVERWRITE_HELP, RESUMED_FOLDERS, check_outputs, output_locks, overwriting

# commands that load a model, a checkpoint or a recipe
TRUST_COMMANDS = ("prune", "inspect", "train", "retrain", "sparsify", "eval", "bench", "export", "sweep", "quantize",
                  "predict", "info", "sensitivity", "recover")
# parameters naming input files, and output files (-> the flag shown in errors)
INPUT_PARAMS = ("model", "recipe", "ckpt", "checkpoint", "checkpoints", "weights", "images", "teacher")
# commands that build a model from a config: the model-size bound (surgery/yolo/config_check.py) can fire
SIZED_COMMANDS = ("prune", "inspect", "train", "retrain", "sparsify", "eval", "bench", "export", "sweep", "quantize",
                  "predict", "sensitivity", "recover", "compress")
NOT_PATHS = ("auto", "none")  # --teacher auto / none name no file
TRUST_HELP = (
    "Allow the checkpoint / recipe / --model to run user code (a 'module:function' or 'file.py:function' "
    "builder) for this call. Without it only registered builders run."
)

MAX_MODEL_GB_HELP = (
    "Largest model a config may build for this call, in GiB: parameters (x4: gradients, Adam) plus one image's "
    "activations at the trace size, estimated before anything is allocated (default: SURGERY_MAX_MODEL_GB, else 12)."
)


def _inputs(bound: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for name in INPUT_PARAMS:
        v = bound.get(name)
        if isinstance(v, (list, tuple)):
            out.extend(v)
        elif v is not None and not (name == "teacher" and str(v).lower() in NOT_PATHS):
            out.append(v)
    return out


def _precheck(command: str, bound: dict[str, Any]) -> None:
    """Before any work: outputs are writable and are not inputs; --kwarg is not given with a checkpoint."""
    from surgery.storage.checkpoint import looks_like_path

    inputs = _inputs(bound)
    check_device(bound.get("device"))
    for key in ("input_size", "macs_size"):  # a side of 100000 would allocate ~1 TB before anything else
        size = bound.get(key)
        if size is not None and not 32 <= size <= 4096:
            raise RecipeError(f"--{key.replace('_', '-')} {size}: expected an integer in [32, 4096]")
    if command == "export":
        opset = bound.get("opset")
        if opset is not None and not 7 <= opset <= 30:
            raise RecipeError(f"--opset {opset}: expected an ONNX opset in [7, 30] (17 is well supported)")
    if bound.get("kwarg") and isinstance(bound.get("model"), str) and ":" not in bound["model"] and looks_like_path(bound["model"]):
        raise RecipeError(
            f"--kwarg does not apply to checkpoint {bound['model']}: it records its own builder arguments"
        )
    check_outputs(command, bound, inputs)


def check_device(device: Any, flag: str = "--device") -> None:
    if device is None:
        return
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d{1,2})?|mps", device):
        raise RecipeError(f"{flag} {device!r}: expected cpu, cuda or cuda:N")
    if device == "mps":
        import torch  # only for mps: --help and cpu runs stay torch-free here

        if not torch.backends.mps.is_available():
            raise RecipeError(f"{flag} mps: Apple's MPS is not available on this machine (use cpu)")
    if device.startswith("cuda"):
        import torch  # only for a cuda device: --help and cpu runs stay torch-free here

        if not torch.cuda.is_available():
            raise RecipeError(f"{flag} {device}: CUDA is not available on this machine (use cpu)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise RecipeError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _refuse_untrusted_early(model: Any, recipe: Any) -> None:
    """Before datasets are built or anything trains: a --model, a recipe's model.name or its
    model.weights checkpoint that names user code is refused now (the same check the loader does)."""
    from surgery.storage.checkpoint import looks_like_path, read_checkpoint
    from surgery.storage.trust import is_user_code, origin, refuse

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
    """``fn`` with a ``--trust-code`` option (and ``--overwrite`` when it writes files); it runs in a
    trust context for that call, with its input files protected from being overwritten and its
    outputs checked up front."""
    sig = inspect.signature(fn, eval_str=True)
    if "trust_code" in sig.parameters:
        return fn
    extra = [inspect.Parameter(
        "trust_code", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--trust-code", help=TRUST_HELP),
    )]  # fmt: skip
    writes = any(name in sig.parameters for name in OUTPUT_PARAMS) and command not in RESUMED_FOLDERS
    if writes and "overwrite" not in sig.parameters:
        extra.append(inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                       default=typer.Option(False, "--overwrite", help=OVERWRITE_HELP)))
    params = list(sig.parameters.values())
    new_sig = sig.replace(parameters=[*params, *extra])

    @functools.wraps(fn)
    def wrapper(*args: Any, trust_code: bool = False, overwrite: bool = False, **kwargs: Any) -> Any:
        from surgery.storage.safety import protecting
        from surgery.storage.trust import origin, trusting

        bound = sig.bind_partial(*args, **kwargs).arguments
        with overwriting(overwrite):
            _precheck(command, bound)
        model, recipe = bound.get("model"), bound.get("recipe")
        where = "--model" if isinstance(model, str) and ":" in model else f"recipe {recipe}" if recipe and not model else None
        with output_locks(command, bound), trusting(trust_code), origin(where), overwriting(overwrite), \
                protecting(p for p in _inputs(bound) if isinstance(p, (str, Path))):  # fmt: skip
            if not trust_code:
                _refuse_untrusted_early(model, recipe)
            return fn(*args, **kwargs)

    wrapper.__signature__ = new_sig  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "trust_code": bool,
                               **({"overwrite": bool} if writes else {})}
    return wrapper


def sized(fn: Any) -> Any:
    """``fn`` with a ``--max-model-gb`` option: it runs with that model-size limit (checked first:
    a finite number of GiB above 0), which only this call sees."""
    sig = inspect.signature(fn, eval_str=True)
    if "max_model_gb" in sig.parameters:
        return fn
    extra = inspect.Parameter("max_model_gb", inspect.Parameter.KEYWORD_ONLY, annotation=float | None,
                              default=typer.Option(None, "--max-model-gb", help=MAX_MODEL_GB_HELP))

    @functools.wraps(fn)
    def wrapper(*args: Any, max_model_gb: float | None = None, **kwargs: Any) -> Any:
        with model_size_limit(max_model_gb):
            return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "max_model_gb": float | None}
    return wrapper


def guard_commands(app: typer.Typer) -> None:
    """Apply :func:`guard` to every registered command in :data:`TRUST_COMMANDS` and :func:`sized`
    (outermost: its value is checked first) to those in :data:`SIZED_COMMANDS`."""
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__ if info.callback else None)
        if name in TRUST_COMMANDS and info.callback is not None:
            info.callback = guard(name, info.callback)
        if name in SIZED_COMMANDS and info.callback is not None:
            info.callback = sized(info.callback)
