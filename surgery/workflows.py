"""The pipeline steps as the CLI and the sweep run them: prune and save, train from a recipe,
retrain a checkpoint. Each takes a resolved :class:`~surgery.config.recipe.Recipe` and returns a typed
result; progress reaches the caller through :class:`Callbacks` (the library never prints).

Under ``torchrun`` the training workflows build the (cached) datasets on rank 0 first and only
rank 0 reports and writes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .config.recipe import (
    AGPSection,
    DataSection,
    Recipe,
    SparsifySection,
    TrainSection,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
)
from .data import dataset_for
from .data.image_folder import image_batches, image_files
from .detectors.builders import ModelSpec, _is_local_file, accepts, build_model, get_builder
from .errors import DataError, PruningError, RecipeError
from .measure import count_params
from .measure.evaluate import evaluate, reference_ground_truth
from .pruning import reconstruct as reconstruction
from .pruning.budget import check_combination, from_config
from .pruning.calibrate import calibration_data
from .pruning.importance import needs_data
from .pruning.masked import AGPSchedule, apply_masks, magnitude_masks, masks_sparsity, prune_masked
from .pruning.plan import MaskedPlan
from .pruning.prune import PruneResult, prune_to
from .pruning.recover import DEFAULT_RECOVER_BATCHES, RECOVER_BATCH_SIZE
from .pruning.sensitivity import LABEL_FREE, analyse, run_key
from .pruning.sparsify import SparsityHook, check_target_ratio
from .pruning.target import find_ratio_for_target
from .storage.checkpoint import Checkpoint, load_checkpoint, resolve_model, save_pruned
from .training.callbacks import Callbacks, WarmupCheck
from .training.distill import distill_hook_for, teacher_path
from .training.distributed import DistInfo, current_dist, main_process_first
from .training.hooks import EvalHook, HookBase, LoggingHook, MaskHook
from .training.records import RecordHook, RunFiles
from .training.train import TrainResult, build_trainer
from .training.transfer import build_with_weights_file, load_checkpoint_with

# --------------------------------------------------------------------------------------------
# data


def load_datasets(
    recipe: Recipe, *, hflip: float = 0.0, val: bool = True, dist_info: DistInfo | None = None
) -> tuple[Dataset, Dataset | None]:
    """The recipe's training set (with ``hflip``) and validation set (``None`` unless ``val``);
    under torchrun rank 0 builds (and caches) them first."""
    def build() -> tuple[Dataset, Dataset | None]:
        train_set = dataset_for(recipe.data, "train", train=True, hflip=hflip)
        val_set = dataset_for(recipe.data, "val", train=False) if val else None
        return train_set, val_set

    return main_process_first(dist_info or current_dist(), build)


def check_classes(model_classes: Any, dataset: Any, callbacks: Callbacks | None = None) -> None:
    """One clear error when the data has more classes than the model's outputs; a note when it
    has fewer (the extra outputs are never trained towards anything)."""
    if model_classes is not None and dataset.num_classes > int(model_classes):
        raise DataError(
            f"the dataset has {dataset.num_classes} classes (with background) but the model only "
            f"{model_classes}: pass --kwarg num_classes={dataset.num_classes} (the class outputs are re-initialised, "
            "every other weight is kept)"
        )
    if model_classes is not None and dataset.num_classes < int(model_classes) and callbacks is not None:
        callbacks.note(f"the model has {model_classes} classes (with background), the data {dataset.num_classes}: "
                       f"--kwarg num_classes={dataset.num_classes} fine-tunes to the data's classes "
                       "(class outputs re-initialised)")


def _transfer_note(transfer: Any, callbacks: Callbacks) -> None:
    if transfer is not None and transfer.reinitialised:
        was = f" ({transfer.classes_before} classes before)" if transfer.classes_before else ""
        callbacks.note(f"re-initialised the class outputs{was}: {', '.join(transfer.reinitialised)}; "
                       f"{transfer.loaded} other tensors loaded")


# --------------------------------------------------------------------------------------------
# prune


def calib_data_for(recipe: Recipe, model: nn.Module) -> Iterable[Any] | None:
    """Calibration batches from the recipe's data section for the data-driven criteria (lazy:
    nothing is loaded unless the criterion asks for them)."""
    if not needs_data(recipe.prune.method):
        return None
    return calibration_data(recipe.data, batches=recipe.prune.calib_batches, model=model)


@dataclass
class PruneOutcome:
    """What :func:`prune_and_save` wrote."""

    path: Path
    kind: str  # structured | masked
    spec: ModelSpec
    structured: PruneResult | None = None
    masked: Any = None  # surgery.pruning.masked.MaskedResult
    recovery: Any = None  # surgery.pruning.recover.RecoveryResult when prune.recover > 0
    cut_metrics: dict[str, Any] | None = None  # what on_cut returned (before recovery)
    allocation: Any = None  # surgery.pruning.sensitivity.SensitivityAllocation with prune.allocation: sensitivity


def prune_and_save(
    source: str,
    recipe: Recipe,
    out: str | Path,
    *,
    trace_size: int = 256,
    macs_input_size: int | None = None,
    given: dict[str, str] | None = None,
) -> PruneOutcome:
    """Prune a model (registered name, ``module:function`` or checkpoint) as the recipe says and
    write the pruned checkpoint atomically. ``method: magnitude`` gives a masked model. The plan
    records where it came from (the default distillation teacher) and the plan it continues.
    ``given``: see :func:`prune_loaded`."""
    check_combination(recipe.prune, given or {}, macs_input_size)  # before loading anything
    model, spec, prior = resolve_model(source, recipe.model.kwargs, recipe.model.weights)
    return prune_loaded(model, spec, prior, recipe, out, source=source, trace_size=trace_size,
                        macs_input_size=macs_input_size, given=given)


def prune_loaded(
    model: nn.Module,
    spec: ModelSpec,
    prior: Checkpoint | None,
    recipe: Recipe,
    out: str | Path,
    *,
    source: str | None = None,
    trace_size: int = 256,
    macs_input_size: int | None = None,
    on_cut: Callable[[nn.Module], dict[str, Any]] | None = None,
    given: dict[str, str] | None = None,
) -> PruneOutcome:
    """:func:`prune_and_save` for a model already in memory (``prior``: its checkpoint, if any).
    ``on_cut(model)`` is called right after the cut, before any recovery (the sweep scores the
    model there). ``given``: the prune settings the user set explicitly, as spelled (CLI flags),
    for :func:`surgery.pruning.budget.from_config` to refuse what would be ignored."""
    cfg = recipe.prune
    recipe = _inherit_data(_naming(recipe, spec), prior)
    previous = prior.plan if prior is not None else None
    origin = str(prior.path) if prior is not None and prior.path is not None else source
    class_names = prior.class_names if prior is not None else None
    if cfg.method == "magnitude":
        check_combination(cfg, given or {}, macs_input_size)
        prior_masks = prior.masks if prior is not None and prior.kind == "masked" else None
        masked = prune_masked(model, cfg.sparsity, cfg.scope)
        if prior_masks:
            _carry_masks(masked, prior_masks, cfg.sparsity, origin)
        plan = MaskedPlan(sparsity=cfg.sparsity, scope=cfg.scope, total_params=masked.total_params,
                          nonzeros_before=masked.nonzeros_before, nonzeros_after=masked.nonzeros_after,
                          source=origin, previous=previous)
        path = save_pruned(out, model, spec, plan, masks=masked.masks, recipe=recipe.to_dict(),
                           metrics={"params": count_params(model).total}, class_names=class_names)
        return PruneOutcome(path=path, kind="masked", spec=spec, masked=masked)
    if prior is not None and prior.kind == "masked" and prior.masks:
        raise PruningError(
            f"{origin} is a masked (unstructured) checkpoint: cutting channels would silently drop its masks. "
            "Prune the dense model it came from, or mask again with --method magnitude"
        )
    if cfg.allocation == "sensitivity" and cfg.sensitivity == LABEL_FREE:
        table = label_free_sensitivity(model, recipe, Path(out).parent, macs_input_size or recipe.bench.input_size)
        cfg = dataclasses.replace(cfg, sensitivity=str(table))
        recipe = dataclasses.replace(recipe, prune=cfg)
    job = from_config(cfg, given=given, macs_input_size=macs_input_size or recipe.bench.input_size)
    recover_data = (calibration_data(recipe.data, batches=cfg.recover, batch_size=RECOVER_BATCH_SIZE, model=model)
                    if job.recovery is not None else None)
    result = prune_to(model, job.budget, data=calib_data_for(recipe, model), method=job.method, rounding=job.rounding,
                      skip=job.skip, anchors=job.anchors, calib_batches=job.calib_batches, recovery=job.recovery,
                      recover_data=recover_data, trace_size=trace_size, macs_size=macs_input_size, on_cut=on_cut)
    result.plan.previous = previous
    result.plan.source = origin
    metrics: dict[str, Any] = {"params": result.report.params_after}
    if result.report.macs_after is not None:
        metrics["macs"] = result.report.macs_after
    if result.recovery is not None:
        metrics["recovery"] = result.recovery.summary()
    path = save_pruned(out, model, spec, result.plan, recipe=recipe.to_dict(), metrics=metrics, class_names=class_names)
    return PruneOutcome(path=path, kind="structured", spec=spec, structured=result, recovery=result.recovery,
                        cut_metrics=result.cut_metrics, allocation=result.allocation.info.get("sensitivity"))


def holdout_split(recipe: Recipe, images: int, recover_batches: int, *, fewer: bool = False) -> Subset:
    """``images`` training images the recovery never sees (the recovery batches are the first
    ``recover_batches x 8`` of the same seeded permutation, :func:`surgery.pruning.calibrate.calibration_data`):
    what compress's proxy mAP and the label-free sensitivity table are scored on, so the validation
    split stays for the final check. ``fewer``: a small training split gives what it has left
    (at least one image) instead of an error."""
    dataset = dataset_for(recipe.data, "train", train=False)
    used = recover_batches * RECOVER_BATCH_SIZE
    if fewer:
        images = max(1, min(images, len(dataset) - used))
    if len(dataset) < used + images:
        raise DataError(f"the training split has {len(dataset)} images: too few for {recover_batches} recovery "
                        f"batches ({used} images) and a held-out calibration split of {images}; "
                        "lower --holdout or --recover")
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(recipe.data.seed))).tolist()
    return Subset(dataset, perm[len(perm) - images:])


# `prune.sensitivity: label-free`: the table measured at prune time, as `surgery sensitivity --label-free`
# was measured in docs/benchmarks/yolo-75.md (each group cut by 0.8 alone, 2 recovery batches, 50 images)
LABEL_FREE_RATIO, LABEL_FREE_IMAGES, LABEL_FREE_RECOVER, LABEL_FREE_MIN_SCORE = 0.8, 50, 2, 0.25


def weights_digest(model: nn.Module) -> str:
    """A SHA-256 of the model's parameters and buffers (names, shapes, values): the key of what was
    measured on these weights, whatever file or builder they came from (an ``ultralytics:best.pt``
    source is not a file path, and a surgery checkpoint's bytes also hold metadata)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def label_free_sensitivity(model: nn.Module, recipe: Recipe, folder: Path, macs_input_size: int) -> Path:
    """The sensitivity table of ``model`` scored label-free: each
    coupled group cut by :data:`LABEL_FREE_RATIO` alone, recovered, and scored by its mAP against the
    model's own detections (score >= :data:`LABEL_FREE_MIN_SCORE`) on :data:`LABEL_FREE_IMAGES` held-out
    training images of the recipe's data (:func:`holdout_split`: neither the recovery's batches nor the
    validation split the cut model is finally scored on); no annotation is read. Written to
    ``folder/sensitivity-KEY.csv`` (KEY: :func:`weights_digest` and these settings), so a second cut
    of the same model (the sweep's other MACs targets) reuses it and a killed run resumes it."""
    cfg = recipe.prune
    method = "l1" if cfg.method == "magnitude" else cfg.method
    subset = holdout_split(recipe, LABEL_FREE_IMAGES, max(cfg.recover, LABEL_FREE_RECOVER), fewer=True)
    key = run_key(weights_digest(model), {"data": vars(recipe.data), "holdout_images": len(subset), "recover": LABEL_FREE_RECOVER,
                                             "method": method, "skip": cfg.skip, "macs_size": macs_input_size,
                                             "round_to": cfg.round_to, "min_channels": cfg.min_channels,
                                             "label_free": LABEL_FREE_MIN_SCORE})
    table = Path(folder) / f"sensitivity-{key}.csv"
    calib = list(calibration_data(recipe.data, batches=LABEL_FREE_RECOVER, batch_size=RECOVER_BATCH_SIZE, model=model))
    reference = reference_ground_truth(model, subset, min_score=LABEL_FREE_MIN_SCORE)

    def score(m: nn.Module) -> dict[str, float]:
        r = evaluate(m, subset, batch_size=8, ground_truth=reference).metrics
        return {"mAP": float(r["mAP"]), "mAP50": float(r["mAP50"])}

    Path(folder).mkdir(parents=True, exist_ok=True)
    analyse(model, csv_path=table, key=key, calib_data=calib, recover_batches=LABEL_FREE_RECOVER, ratios=[LABEL_FREE_RATIO],
            cfg=dataclasses.replace(cfg, method=method), macs_input_size=macs_input_size, score=score)
    return table


def _inherit_data(recipe: Recipe, prior: Checkpoint | None) -> Recipe:
    """The data a checkpoint records travels down the plan chain: when ``recipe``'s data section is
    the defaults (no --data, no recipe data), the checkpoint's own (e.g. the COCO folder it was
    trained on) is used for calibration and saved, so ``eval pruned.pt`` without --data scores the
    data the model knows, not a generated synthetic set."""
    data = (prior.recipe or {}).get("data") if prior is not None and isinstance(prior.recipe, dict) else None
    if not isinstance(data, dict) or recipe.data != DataSection():
        return recipe
    try:
        recorded = recipe_from_dict({"data": data}, f"{prior.path} (recipe)").data
    except RecipeError:
        return recipe  # an older schema: the defaults, as before
    recipe.data = recorded  # ``recipe`` is _naming's copy
    return recipe


def _naming(recipe: Recipe, spec: ModelSpec) -> Recipe:
    """A copy of ``recipe`` whose model section names the model actually pruned (``--model`` and
    ``--kwarg`` flags, or the checkpoint's builder), so the saved recipe rebuilds the same thing."""

    saved = copy.deepcopy(recipe)
    saved.model.name = spec.name
    saved.model.kwargs = {k: v for k, v in spec.kwargs.items() if k not in ("weights", "weights_backbone")}
    return saved


def _carry_masks(masked: Any, prior: dict[str, torch.Tensor], sparsity: float, source: str | None) -> None:
    """Masking a masked checkpoint again keeps every weight it had pruned (pruned weights are zero,
    so new magnitude masks contain the old ones); a lower target than it already has is refused."""
    before = masks_sparsity(prior)
    if sparsity + 1e-6 < before:
        raise PruningError(
            f"{source} is already {before:.0%} masked; sparsity {sparsity:g} would un-prune weights: use >= {before:.3g}"
        )
    for name, m in prior.items():
        if name in masked.masks:
            masked.masks[name] = masked.masks[name] & m.to(masked.masks[name].device, torch.bool)


# --------------------------------------------------------------------------------------------
# train / retrain


@dataclass
class TrainOutcome:
    result: TrainResult
    out: Path
    spec: ModelSpec
    recipe: Recipe
    device: str
    world_size: int = 1
    files: Any = None  # surgery.training.records.RunFiles: best.pt, metrics.csv / .jsonl beside the checkpoint


def _fit(
    model: nn.Module,
    spec: ModelSpec,
    recipe: Recipe,
    cfg: TrainSection,
    train_set: Dataset,
    val_set: Dataset | None,
    out: Path,
    *,
    device: str,
    resume: bool,
    dist_info: DistInfo,
    callbacks: Callbacks,
    hooks: Sequence[HookBase] = (),
    **kw: Any,
) -> TrainOutcome:
    hooks = list(hooks)
    files = RunFiles.for_checkpoint(out)
    hooks.append(RecordHook(files))
    hooks.append(WarmupCheck(callbacks.warn))
    if callbacks.on_step is not None:
        hooks.append(LoggingHook(callbacks.on_step))
    if val_set is not None:
        hooks.append(EvalHook(val_set, cfg.eval_every, progress=callbacks.on_eval_progress,
                              on_result=callbacks.on_eval))
    trainer = build_trainer(model, spec, train_set, cfg, val_set=val_set, out=out, hooks=hooks, device=device,
                            recipe=recipe, dist_info=dist_info, num_workers=recipe.data.num_workers,
                            best_path=files.best if val_set is not None else None, **kw)
    if resume and dist_info.is_main:
        callbacks.note(f"resuming from {out}" if out.exists() else f"--resume: {out} does not exist yet; starting from step 0")
    callbacks.stage("training")
    result = trainer.train(resume=resume)
    return TrainOutcome(result=result, out=out, spec=spec, recipe=recipe, device=str(trainer.device),
                        world_size=dist_info.world_size, files=files)


def train_from_recipe(
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "cpu",
    resume: bool = False,
    evaluate: bool = True,
    dist_info: DistInfo | None = None,
    callbacks: Callbacks | None = None,
    hooks: Sequence[HookBase] = (),
) -> TrainOutcome:
    """Train the recipe's dense model (``model`` section) on its data with its ``train`` section.

    ``num_classes`` comes from the data when the recipe does not set it and the builder takes
    it; ``model.weights`` (a torchvision weights name or a file) initialises the network. The
    seed makes the initial weights reproducible."""
    cb = callbacks or Callbacks()
    info = dist_info or current_dist()
    name = recipe.model.name
    if not name:
        raise RecipeError("no model: pass --model or a recipe with model.name")
    cb.stage("preparing data")
    train_set, val_set = load_datasets(recipe, hflip=recipe.train.hflip, val=evaluate, dist_info=info)
    kwargs = dict(recipe.model.kwargs)
    if "num_classes" not in kwargs and accepts(get_builder(name), "num_classes"):
        kwargs["num_classes"] = train_set.num_classes
        names = ", ".join(getattr(train_set, "class_names", [])[1:])
        cb.note(f"num_classes={train_set.num_classes} from the data ({names} + background)")
    recipe.model.kwargs = dict(kwargs)
    check_classes(kwargs.get("num_classes"), train_set, cb)
    torch.manual_seed(recipe.train.seed)  # same seed, same initial weights
    spec = ModelSpec(name, kwargs)  # the checkpoint holds the weights: rebuild without them
    weights = recipe.model.weights
    if weights and _is_local_file(weights):  # a file of another num_classes: all but the class outputs

        model, transfer = build_with_weights_file(spec, weights)
        _transfer_note(transfer, cb)
    else:
        model = build_model(spec, weights=weights) if weights else build_model(spec)
    return _fit(model, spec, recipe, recipe.train, train_set, val_set, Path(out), device=device, resume=resume,
                dist_info=info, callbacks=cb, hooks=hooks)


def recipe_for_checkpoint(ckpt: Checkpoint, recipe_path: str | Path | None, overrides: dict[str, Any]) -> Recipe:
    """The recipe a retraining uses: the given file, else the one saved in the checkpoint, else
    the defaults; ``overrides`` (dotted keys, ``None`` ignored) on top."""
    if recipe_path is not None:
        return apply_overrides(load_recipe(recipe_path), overrides)
    base = Recipe(source="<defaults>")
    if ckpt.recipe:
        try:
            base = recipe_from_dict(ckpt.recipe, f"{ckpt.path} (recipe)")
        except RecipeError:
            pass  # a recipe of an older schema: the defaults, with the flags on top
    return apply_overrides(base, overrides)


def agp_schedule(recipe: Recipe, total_steps: int, final: float, initial: float) -> tuple[AGPSection, list[str]]:
    """An AGP schedule reaching ``final`` sparsity within ``total_steps``: the recipe's
    ``prune.agp`` clipped to the run, or by default pruning during the first two thirds."""
    notes: list[str] = []
    end = max(1, int(total_steps * 2 / 3))  # prune during the first two thirds, then fine-tune
    section = AGPSection(initial_sparsity=initial, final_sparsity=final, start_step=0, end_step=end,
                         frequency=max(1, end // 10))
    r = recipe.prune.agp
    if r is not None:
        end = min(r.end_step, total_steps)
        section = AGPSection(initial_sparsity=min(r.initial_sparsity, final), final_sparsity=final,
                             start_step=min(r.start_step, end - 1), end_step=end, frequency=r.frequency)
        if end < r.end_step:
            notes.append(f"AGP end_step {r.end_step} is past the last step; using {end}")
    return section, notes


def distill_hook(recipe: Recipe, ckpt: Checkpoint, student: nn.Module) -> HookBase | None:
    """The distillation hook the recipe's ``retrain.distill`` asks for (``None``: no distillation).
    The teacher is ``distill.teacher`` or the dense checkpoint the plan chain was pruned from."""
    cfg = recipe.retrain.distill
    if cfg is None or cfg.type == "none":
        return None
    path = teacher_path(ckpt.plan, cfg.teacher)
    if path is None:
        raise RecipeError(
            f"distillation needs a teacher: {ckpt.path} records no checkpoint it was pruned from; "
            "pass --teacher DENSE.pt (or retrain.distill.teacher)"
        )
    teacher, _ = load_checkpoint(path)
    return distill_hook_for(teacher, student, cfg, teacher_path=path)


def retrain_checkpoint(
    ckpt_path: str | Path,
    recipe: Recipe,
    out: str | Path,
    *,
    device: str = "cpu",
    resume: bool = False,
    evaluate: bool = True,
    sparsity: float | None = None,
    agp: bool = False,
    dist_info: DistInfo | None = None,
    callbacks: Callbacks | None = None,
    hooks: Sequence[HookBase] = (),
    kwargs: dict[str, Any] | None = None,
) -> TrainOutcome:
    """Retrain a pruned, masked or dense checkpoint with the recipe's ``retrain`` section; masks
    of a masked checkpoint stay exact. ``sparsity`` masks that fraction of the weights (at once,
    or gradually on an AGP schedule with ``agp``). ``kwargs`` rebuild it with other builder
    arguments: ``num_classes`` fine-tunes to new classes (class outputs re-initialised)."""
    if agp and sparsity is None:
        raise RecipeError("--agp needs --sparsity (the final sparsity)")
    cb = callbacks or Callbacks()
    info = dist_info or current_dist()
    if kwargs:
        model, ckpt, transfer = load_checkpoint_with(ckpt_path, kwargs)
        _transfer_note(transfer, cb)
    else:
        model, ckpt = load_checkpoint(ckpt_path)
    recipe.model.name, recipe.model.kwargs = ckpt.spec.name, dict(ckpt.spec.kwargs)  # the saved recipe names it
    cfg = recipe.retrain
    cb.stage("preparing data")
    train_set, val_set = load_datasets(recipe, hflip=cfg.hflip, val=evaluate, dist_info=info)
    check_classes(ckpt.spec.kwargs.get("num_classes"), train_set, cb)
    masks, hooks = ckpt.masks, list(hooks)
    if sparsity is not None and agp:
        per_epoch = max(1, len(train_set) // max(1, info.world_size) // cfg.batch_size)
        total = max(1, math.ceil(cfg.epochs * per_epoch)) if cfg.epochs is not None else cfg.steps
        section, notes = agp_schedule(recipe, total, sparsity, masks_sparsity(masks) if masks else 0.0)
        for n in notes:
            cb.note(n)
        hooks.insert(0, MaskHook(AGPSchedule.from_section(section), recipe.prune.scope))
        recipe.prune.agp = section
        recipe.prune.sparsity = sparsity
    elif sparsity is not None:
        masks = magnitude_masks(model, sparsity, recipe.prune.scope, previous=masks)
        apply_masks(model, masks)
        recipe.prune.sparsity = sparsity
    what = ckpt.kind + (f", {masks_sparsity(masks):.0%} of masked weights zero" if masks else "")
    distill = distill_hook(recipe, ckpt, model)
    if distill is not None:
        hooks.append(distill)
        what += f", imitating {distill.teacher_path}"
    cb.note(f"retraining {ckpt_path} ({ckpt.spec.name}, {what})")
    torch.manual_seed(cfg.seed)
    source_metrics = {k: v for k, v in ckpt.metrics.items() if isinstance(v, (int, float, str))}
    return _fit(model, ckpt.spec, recipe, cfg, train_set, val_set, Path(out), device=device, resume=resume,
                dist_info=info, callbacks=cb, hooks=hooks, masks=masks, kind=ckpt.kind, plan=ckpt.plan,
                metrics={"input": {"checkpoint": str(ckpt_path), "kind": ckpt.kind, **source_metrics}})


def sparsify_checkpoint(
    ckpt_path: str | Path,
    recipe: Recipe,
    out: str | Path,
    *,
    ratio: float | None = None,
    device: str = "cpu",
    resume: bool = False,
    evaluate: bool = True,
    dist_info: DistInfo | None = None,
    callbacks: Callbacks | None = None,
) -> TrainOutcome:
    """Sparse training of a dense checkpoint before it is cut (:mod:`surgery.pruning.sparsify`):
    ``recipe.prune.sparsify`` (steps, weights, warm-up) with the ``retrain`` section's optimizer
    and schedule. ``ratio`` (or ``prune.target_macs``/``target_params``, searched here) targets the
    channels that cut will remove; without either every channel of every prunable group is
    penalised. The output is a dense checkpoint: prune it as usual."""

    check_target_ratio(ratio)  # before the checkpoint is loaded or anything trains
    cb = callbacks or Callbacks()
    info = dist_info or current_dist()
    model, ckpt = load_checkpoint(ckpt_path)
    if ckpt.kind != "dense":
        raise PruningError(f"{ckpt_path} is a {ckpt.kind} checkpoint: sparse training goes before the cut, on a dense model")
    recipe.model.name, recipe.model.kwargs = ckpt.spec.name, dict(ckpt.spec.kwargs)
    scfg = recipe.prune.sparsify or SparsifySection()
    recipe.prune.sparsify = scfg
    pcfg = recipe.prune
    if ratio is None and (pcfg.target_macs is not None or pcfg.target_params is not None):

        search = pcfg if not needs_data(pcfg.method) else dataclasses.replace(pcfg, method="l1")
        found = find_ratio_for_target(model, search, target_macs=pcfg.target_macs, target_params=pcfg.target_params,
                                      macs_input_size=recipe.bench.input_size)
        ratio = found.ratio
        cb.note(f"targeting the channels of a cut at ratio {ratio:.3f} ({found.note or 'meets the target'})")
    cfg = dataclasses.replace(recipe.retrain, steps=scfg.steps, epochs=None, distill=None)
    recipe.retrain = cfg
    hook = SparsityHook(model, scfg, prune=pcfg, ratio=ratio)
    cb.note(f"sparse training {ckpt_path} for {scfg.steps} steps (group lasso {scfg.weight:g}, norm L1 "
            f"{scfg.norm_weight:g}, " + (f"targeting ratio {ratio:.3f})" if hook.targeted else "all channels)"))
    cb.stage("preparing data")
    train_set, val_set = load_datasets(recipe, hflip=cfg.hflip, val=evaluate, dist_info=info)
    torch.manual_seed(cfg.seed)
    return _fit(model, ckpt.spec, recipe, cfg, train_set, val_set, Path(out), device=device, resume=resume,
                dist_info=info, callbacks=cb, hooks=[hook], kind="dense",
                metrics={"input": {"checkpoint": str(ckpt_path)}, "sparsify": {"ratio": ratio}})


@dataclass
class RecoveredCheckpoint:
    """What :func:`recover_checkpoint` wrote."""

    path: Path
    teacher: str
    images: int  # image files found (at most ``batches`` x the batch size are read)
    report: reconstruction.ReconstructReport


def recover_checkpoint(
    pruned: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    teacher: str | None = "auto",
    batches: int = DEFAULT_RECOVER_BATCHES,
    batch_size: int = RECOVER_BATCH_SIZE,
    steps: int = reconstruction.DEFAULT_STEPS,
    seconds: float = reconstruction.DEFAULT_SECONDS,
    lr: float = reconstruction.DEFAULT_LR,
    device: str = "cpu",
    trust_code: bool | None = None,
) -> RecoveredCheckpoint:
    """Label-free recovery of a pruned checkpoint: :func:`surgery.pruning.reconstruct.reconstruct` against ``teacher`` (a dense
    checkpoint; ``auto``/``None``: the one the plan records it was pruned from) on the images of
    ``images`` (:func:`surgery.data.image_folder.image_files`), written atomically to ``out`` with the plan it had and the
    recovery's summary in its metrics."""
    student, ck = load_checkpoint(pruned, device, trust_code=trust_code)
    if ck.kind != "structured" or ck.plan is None:
        raise PruningError(f"{pruned} is a {ck.kind} checkpoint: recovery needs one whose channels were cut (surgery prune)")
    source = teacher_path(ck.plan, teacher)
    if source is None:
        raise PruningError(f"{pruned} records no dense checkpoint it was pruned from: pass --teacher DENSE.pt")
    dense, _ = load_checkpoint(source, device, trust_code=trust_code)
    files = image_files(images)
    report = reconstruction.reconstruct(dense, student, image_batches(files, batch_size=batch_size, max_batches=batches),
                         batches=batches, steps=steps, seconds=seconds, lr=lr)
    ck.plan.extra["recovery"] = report.summary()
    metrics = {k: v for k, v in ck.metrics.items() if k not in ("mAP", "mAP50")}  # the weights changed: stale
    path = save_pruned(out, student, ck.spec, ck.plan, recipe=ck.recipe, metrics={**metrics, "recovery": report.summary()},
                       class_names=ck.class_names)
    return RecoveredCheckpoint(path=path, teacher=str(source), images=len(files), report=report)


__all__ = [
    "RecoveredCheckpoint",
    "recover_checkpoint",
    "Callbacks",
    "PruneOutcome",
    "TrainOutcome",
    "agp_schedule",
    "calib_data_for",
    "check_classes",
    "load_datasets",
    "prune_and_save",
    "prune_loaded",
    "recipe_for_checkpoint",
    "retrain_checkpoint",
    "sparsify_checkpoint",
    "train_from_recipe",
]
