"""Recipes: versioned YAML validated into dataclasses.

A recipe is data. It is read with ``yaml.safe_load`` and every key is checked against the
dataclasses below: an unknown key or a bad value raises :class:`RecipeError` naming the file, the
dotted key and what is allowed. CLI flags override recipe values through :func:`apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError, RecipeError
from ..pruning.budget import Recovery
from ..pruning.importance import list_importances, pruning_methods
from ..registry import did_you_mean
from ..storage.trust import read_small_file, safe_yaml_load
from .catalog import find_recipe

SCHEMA_VERSION = 1
ALLOCATIONS = ("uniform", "global", "sensitivity")
# surgery.deployment.quantize.FORMS and "auto" (listed here: recipes load without torch; a test keeps them equal)
INT8_FORMS = ("auto", "qdq-per-channel", "qdq-per-tensor", "qoperator-per-channel", "qoperator-per-tensor")


def _finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


@dataclass
class ModelSection:
    name: str = "fcos_resnet18_slim"
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None  # None, a torchvision weights name ("DEFAULT") or a checkpoint path


@dataclass
class DataSection:
    # "synthetic" (the built-in generated set), "coco:ROOT", "voc:ROOT", or an annotation json path
    source: str = "synthetic"
    root: str | None = None  # where the synthetic set is cached (default: ~/.cache/surgery)
    images: int = 2000  # synthetic: training images (val gets a tenth, at least 20)
    size: int = 160  # synthetic: image side in pixels
    seed: int = 0
    num_workers: int = 0

    def validate(self) -> None:
        from ..data.sources import MAX_SYNTH_IMAGES, MAX_SYNTH_SIZE, normalize_source

        _check(0 < self.images <= MAX_SYNTH_IMAGES, "images", f"an integer in [1, {MAX_SYNTH_IMAGES}]")
        _check(32 <= self.size <= MAX_SYNTH_SIZE, "size", f"an integer in [32, {MAX_SYNTH_SIZE}]")
        _check(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)")
        _check(0 <= self.num_workers <= 64, "num_workers", "an integer in [0, 64]")
        _check(self.root is None or bool(self.root.strip()), "root", "a folder path or null")
        try:
            self.source = normalize_source(self.source)  # "COCO:x" -> "coco:x", a COCO/VOC folder -> "coco:DIR"
        except DataError as e:
            _check(False, "source", str(e))


@dataclass
class AGPSection:
    """Zhu & Gupta's automated gradual pruning: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3."""

    initial_sparsity: float = 0.0
    final_sparsity: float = 0.8
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 50

    def validate(self) -> None:
        _check(0.0 <= self.initial_sparsity < 1.0, "initial_sparsity", "a number in [0, 1)")
        _check(0.0 < self.final_sparsity < 1.0, "final_sparsity", "a number in (0, 1)")
        _check(self.initial_sparsity <= self.final_sparsity, "initial_sparsity", "<= final_sparsity")
        _check(0 <= self.start_step < self.end_step, "end_step", "an integer > start_step >= 0")
        _check(self.frequency >= 1, "frequency", "an integer >= 1")


@dataclass
class AnchorSection:
    """Which anchor shapes to keep: indices into each level's (size x aspect-ratio) list."""

    keep_sizes: list[int] | None = None  # per-level size indices to keep (same for every level)
    keep_aspect_ratios: list[float] | None = None  # aspect-ratio values to keep


@dataclass
class SparsifySection:
    """Prune-aware sparse training before the cut (:mod:`surgery.pruning.sparsify`): group lasso over the
    coupled groups and the norm-gamma L1 of network slimming, as proximal steps."""

    steps: int = 100  # sparse training steps (in a sweep's '+sparse' variants: taken from the retraining budget)
    weight: float = 1.0  # group lasso: total shrink over the run, in units of each group's mean channel norm
    norm_weight: float = 0.0  # network slimming: total L1 shrink of norm gammas, in units of the group's mean |gamma|
    warmup_steps: int = 10  # no shrink for the first N steps (at most steps - 1); then it grows linearly
    targeted: bool = True  # shrink only the channels the following cut removes (when its ratio is known)

    def validate(self) -> None:
        _check(1 <= self.steps <= 10**8, "steps", "an integer in [1, 10**8]")
        _check(math.isfinite(self.weight) and 0 <= self.weight <= 100, "weight", "a number in [0, 100]")
        _check(math.isfinite(self.norm_weight) and 0 <= self.norm_weight <= 100, "norm_weight", "a number in [0, 100]")
        _check(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0 (capped at steps - 1)")
        _check(self.weight > 0 or self.norm_weight > 0, "weight", "> 0 (or norm_weight > 0)")


@dataclass
class PruneSection:
    method: str = "l1"  # a registered criterion (surgery.pruning.importance: l1 | l2 | bn | taylor | fisher) or magnitude
    ratio: float = 0.5  # fraction of channels removed per coupled group
    global_ranking: bool = False
    round_to: int = 1
    # false: groups narrower than 4 x round_to round to less (halved), so MACs targets land on thin nets
    strict_round_to: bool = False
    min_channels: int = 8
    overrides: dict[str, float] = field(default_factory=dict)  # layer-name glob -> ratio
    skip: list[str] = field(default_factory=list)  # layer-name globs never cut ("@head": what keep_head adds)
    # keep the detection head's own widths (YOLO: the Detect branches cv2/cv3/one2one_*; torchvision: `head`),
    # the MACs target met by cutting the backbone and neck more: adds "@head" to skip
    keep_head: bool = False
    anchors: AnchorSection | None = None
    calib_batches: int = 4  # taylor/fisher: batches of the data section's train split to rank with
    # fraction of the dense MACs / params to KEEP: the ratio is searched (surgery.pruning.target), ratio ignored
    target_macs: float | None = None
    target_params: float | None = None
    # fraction of the dense network latency to keep on `runtime` (surgery.pruning.latency): per-group widths
    target_latency: float | None = None
    runtime: str = "onnxruntime"  # onnxruntime | openvino | torch: where the latency table is measured
    latency_device: str = "cpu"  # cpu | cuda (runtime torch): the device the latency table and its check run on
    # masked pruning
    sparsity: float = 0.8
    scope: str = "layer"  # layer | global
    agp: AGPSection | None = None
    steps: int = 1  # progressive pruning: cut in this many rounds, retraining in between
    # recovery without retraining (surgery.pruning.recover): calibration batches of the data section's train
    # split for the least-squares re-fit + BatchNorm re-estimation after the cut; 0 = off
    recover: int = 0
    # refit (least squares + BatchNorm, surgery.pruning.recover) | reconstruct (then Adam steps matching the dense
    # model's head outputs on the calibration images, no labels read; surgery.pruning.reconstruct)
    recover_method: str = Recovery.method
    recover_steps: int = Recovery.steps  # reconstruct: at most this many optimiser steps...
    recover_seconds: float = Recovery.seconds  # ...and this wall-clock budget for the whole recovery (re-fit included)
    recover_lr: float = Recovery.lr  # reconstruct: Adam's learning rate
    # how the cut is spread over the groups: uniform (one ratio, or overrides), global (one ranking
    # across groups, = global_ranking), sensitivity (per-group ratios from a `surgery sensitivity`
    # CSV that meet target_macs while cutting the insensitive groups more; a --ratio, --keep-params or
    # --keep-latency flag on a recipe with it cuts uniformly)
    allocation: str = "uniform"
    # allocation sensitivity: the CSV `surgery sensitivity` wrote, or "label-free": the prune measures the table of the
    # checkpoint it cuts, scored against that model's own detections (no annotation read; surgery.workflows)
    sensitivity: str | None = None
    sparsify: SparsifySection | None = None  # sparse training before the cut ('+sparse' sweep techniques)

    def __post_init__(self) -> None:
        self._head_entry()

    def _head_entry(self) -> None:
        # "@head" in skip is keep_head's own entry (surgery.pruning.graph.HEAD): set and cleared with it
        self.skip = [p for p in self.skip if p != "@head"] + (["@head"] if self.keep_head else [])

    def validate(self) -> None:
        methods = pruning_methods()
        _check(self.method in methods, "method", f"one of {', '.join(methods)}{did_you_mean(self.method, methods)}")
        _check(0.0 < self.ratio < 1.0, "ratio", "a number strictly between 0 and 1")
        _check(0.0 < self.sparsity < 1.0, "sparsity", "a number strictly between 0 and 1")
        _check(self.round_to >= 1, "round_to", "an integer >= 1")
        _check(self.min_channels >= 1, "min_channels", "an integer >= 1")
        _check(self.steps >= 1, "steps", "an integer >= 1")
        _check(self.scope in ("layer", "global"), "scope", "'layer' or 'global'")
        _check(self.round_to <= 4096 and self.min_channels <= 4096, "round_to", "an integer in [1, 4096]")
        for k, v in self.overrides.items():
            _check(0.0 <= v < 1.0, f"overrides.{k}", "a ratio in [0, 1)")
        _check(self.calib_batches >= 1, "calib_batches", "an integer >= 1")
        for key in ("target_macs", "target_params"):
            value = getattr(self, key)
            _check(value is None or 0.0 < value < 1.0, key, "a fraction to keep strictly between 0 and 1, or null")
            _check(value is None or self.method != "magnitude", key, "null for method magnitude (masks keep the MACs)")
        _check(self.target_macs is None or self.target_params is None, "target_params", "null when target_macs is set")
        _check(isinstance(self.recover, int) and 0 <= self.recover <= 10_000, "recover",
               "a number of calibration batches in [0, 10000] (0: no recovery)")
        _check(self.recover == 0 or self.method != "magnitude", "recover",
               "0 for method magnitude (recovery re-fits the layers a structured cut changed)")
        _check(self.recover_method in ("refit", "reconstruct"), "recover_method", "'refit' or 'reconstruct'")
        _check(isinstance(self.recover_steps, int) and 0 <= self.recover_steps <= 10**6, "recover_steps",
               "an integer in [0, 1000000]")
        _check(math.isfinite(self.recover_seconds) and self.recover_seconds > 0, "recover_seconds", "a number > 0")
        _check(math.isfinite(self.recover_lr) and 0 < self.recover_lr < 1, "recover_lr", "a number in (0, 1)")
        _check(isinstance(self.keep_head, bool), "keep_head", "true or false")
        self._head_entry()
        _check(self.allocation in ALLOCATIONS, "allocation", f"one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "global":
            self.global_ranking = True
        if self.allocation == "sensitivity":
            _check(self.target_macs is not None, "target_macs",
                   "a fraction of the MACs to keep: allocation 'sensitivity' meets a MACs target")
            _check(bool(self.sensitivity), "sensitivity",
                   "the CSV written by `surgery sensitivity` (allocation 'sensitivity' reads it)")
            _check(not self.global_ranking, "global_ranking", "false with allocation 'sensitivity'")
        _check(self.target_latency is None or 0.0 < self.target_latency < 1.0, "target_latency",
               "a fraction of the dense network latency to keep strictly between 0 and 1, or null")
        _check(self.target_latency is None or (self.target_macs is None and self.target_params is None),
               "target_latency", "null when target_macs or target_params is set")
        _check(self.target_latency is None or self.method != "magnitude", "target_latency",
               "null for method magnitude (masks keep the latency)")
        _check(self.runtime in ("onnxruntime", "openvino", "torch"), "runtime", "'onnxruntime', 'openvino' or 'torch'")
        _check(self.latency_device == "cpu" or (self.latency_device == "cuda" and self.runtime == "torch"),
               "latency_device", "'cpu', or 'cuda' with runtime torch")


@dataclass
class DistillSection:
    """Retraining with the dense model as teacher (:mod:`surgery.training.distill`)."""

    # none | imitation (fine-grained feature imitation, Wang et al. 2019; + response_weight) |
    # response (only the head's outputs, weighted by `weight`)
    type: str = "none"
    teacher: str | None = None  # a checkpoint; null / "auto": the dense checkpoint the plan was pruned from
    weight: float = 1.0  # imitation loss weight (loss: mean squared error per channel at the masked locations / 2)
    warmup_steps: int = 0  # no imitation for the first N steps
    psi: float = 0.5  # anchor-based heads: IoU > psi x the box's best anchor IoU
    center_radius: float = 1.5  # anchor-free heads: within this many strides of a box centre
    levels: list[str] | None = None  # feature levels imitated (default: every level the heads read)
    response_weight: float = 0.0  # > 0: also distill the classification outputs (dense heads)
    temperature: float = 1.0

    def validate(self) -> None:
        _check(self.type in ("none", "imitation", "response"), "type", "'none', 'imitation' or 'response'")
        _check(math.isfinite(self.weight) and self.weight >= 0, "weight", "a number >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        _check(0.0 < self.psi <= 1.0, "psi", "a number in (0, 1]")
        _check(math.isfinite(self.center_radius) and self.center_radius > 0, "center_radius", "a positive number")
        _check(math.isfinite(self.response_weight) and self.response_weight >= 0, "response_weight", "a number >= 0")
        _check(math.isfinite(self.temperature) and self.temperature > 0, "temperature", "a positive number")


@dataclass
class TrainSection:
    steps: int = 1000
    epochs: float | None = None  # if set, overrides steps (epochs x batches per epoch)
    batch_size: int = 8
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    # retraining a pruned model (structured or masked): its peak learning rate (null: lr); dense models keep lr
    pruned_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | step | constant
    step_milestones: list[float] = field(default_factory=lambda: [0.7, 0.9])  # fractions of steps
    clip_grad: float | None = 10.0
    eval_every: int = 0  # 0: only at the end
    checkpoint_every: int = 200
    log_every: int = 10
    hflip: float = 0.5
    amp: bool = True  # used on CUDA only
    seed: int = 0
    ema: float = 0.0  # > 0: evaluate and save an exponential moving average of the weights (decay, e.g. 0.99)
    distill: DistillSection | None = None  # retraining only: learn from the dense model too

    def validate(self) -> None:
        _check(1 <= self.steps <= 10**8, "steps", "an integer in [1, 10**8]")
        _check(self.epochs is None or (math.isfinite(self.epochs) and 0 < self.epochs <= 10**5), "epochs",
               "a finite number in (0, 100000] or null")
        _check(1 <= self.batch_size <= 4096, "batch_size", "an integer in [1, 4096]")
        _check(self.optimizer in ("adamw", "sgd"), "optimizer", "'adamw' or 'sgd'")
        _check(math.isfinite(self.lr) and 0 < self.lr <= 10, "lr", "a finite number in (0, 10]")
        _check(self.pruned_lr is None or (math.isfinite(self.pruned_lr) and 0 < self.pruned_lr <= 10), "pruned_lr",
               "a finite number in (0, 10], or null for lr")
        _check(math.isfinite(self.momentum) and 0 <= self.momentum < 1, "momentum", "a number in [0, 1)")
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        _check(self.clip_grad is None or (math.isfinite(self.clip_grad) and self.clip_grad > 0), "clip_grad",
               "a finite number > 0, or null for no clipping")
        _check(self.eval_every >= 0, "eval_every", "an integer >= 0")
        _check(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
        _check(self.log_every >= 1, "log_every", "an integer >= 1")
        _check(all(math.isfinite(m) and 0 < m < 1 for m in self.step_milestones), "step_milestones",
               "fractions strictly between 0 and 1")
        _check(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)")
        _check(self.schedule in ("cosine", "step", "constant"), "schedule", "cosine, step or constant")
        _check(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        _check(0.0 <= self.hflip <= 1.0, "hflip", "a probability in [0, 1]")
        _check(math.isfinite(self.ema) and 0.0 <= self.ema < 1.0, "ema", "a decay in [0, 1) (0: off)")

    def for_kind(self, kind: str) -> TrainSection:
        """This section as it trains a checkpoint of ``kind``: a pruned one (``structured`` or
        ``masked``) at ``pruned_lr`` when set, a dense one (the sweep's control) at ``lr``."""
        if kind == "dense" or self.pruned_lr is None:
            return self
        return dataclasses.replace(self, lr=self.pruned_lr)


@dataclass
class BenchSection:
    input_size: int = 320
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    warmup: int = 3
    runs: int = 20
    threads: int = 2
    device: str = "cpu"
    # False: the model keeps its own resize (min_size/max_size saved with it); True: the network
    # runs at input_size (its transform is set to input_size), i.e. the latency of that deployment
    resize_model: bool = False
    # two-stage models: MACs and latency with exactly this many RoIs reaching the box head
    # (None: surgery.measure.workload.MACS_ROIS, as prune counts), so variants are compared at equal work
    rois: int | None = None
    # torch (eager), onnxruntime or openvino (each checkpoint exported, then timed in that runtime)
    runtime: str = "torch"
    # f32 | bf16 | f16: OpenVINO's inference precision (its CPU default is bf16 where the CPU has it:
    # f32 unless asked), torch on CUDA: autocast to that type; named in every table
    precision: str = "f32"
    # torch on CUDA: none (eager) | cuda-graphs (the network captured once, replayed) |
    # reduce-overhead (torch.compile's CUDA-graph mode) | default (torch.compile, no graphs)
    compile: str = "none"
    # torch on CPU: "auto" times NCHW and channels_last (NHWC) and keeps the faster; "on" / "off"
    channels_last: str = "auto"
    # ONNX Runtime's worker threads spin-wait between operators (its own default, what a dedicated
    # device runs). Off by default: on a shared machine spinning threads fight the other jobs
    # (10x slower on a busy 2-core box), and without it each parallel operator pays a thread
    # wake-up, which a thin pruned model with many small operators feels most (docs/benchmarks/deployment-speed.md)
    spinning: bool = False

    def validate(self) -> None:
        _check(self.runtime in ("torch", "onnxruntime", "openvino"), "runtime", "'torch', 'onnxruntime' or 'openvino'")
        _check(self.precision in ("f32", "bf16", "f16"), "precision", "'f32', 'bf16' or 'f16'")
        _check(self.precision == "f32" or self.runtime == "openvino" or self.device == "cuda", "precision",
               "'f32' (bf16/f16: runtime openvino, or torch on device cuda)")
        _check(self.compile in ("none", "cuda-graphs", "reduce-overhead", "default"), "compile",
               "'none', 'cuda-graphs', 'reduce-overhead' or 'default'")
        _check(self.compile in ("none", "default") or self.device == "cuda", "compile",
               "'none' or 'default' on the CPU (CUDA graphs need device cuda)")
        _check(self.compile == "none" or self.runtime == "torch", "compile", "'none' unless runtime is torch")
        _check(self.channels_last in ("auto", "on", "off"), "channels_last", "'auto', 'on' or 'off'")
        _check(32 <= self.input_size <= 4096, "input_size", "an integer in [32, 4096]")
        _check(all(1 <= b <= 1024 for b in self.batch_sizes) and self.batch_sizes, "batch_sizes", "integers in [1, 1024]")
        _check(1 <= self.runs <= 100_000, "runs", "an integer in [1, 100000]")
        _check(self.warmup >= 0, "warmup", "an integer >= 0")
        _check(1 <= self.threads <= 1024, "threads", "an integer in [1, 1024]")
        _check(self.device in ("cpu", "cuda"), "device", "'cpu' or 'cuda'")
        _check(self.rois is None or self.rois >= 1, "rois", "a positive integer or null")


@dataclass(frozen=True)
class Technique:
    """One way to prune and recover, written ``criterion[+sparse][+distill][+progressive]`` in a
    recipe's ``sweep.techniques`` (``l1``, ``taylor+distill``, ``l1+sparse``...). ``+sparse``:
    ``prune.sparsify.steps`` of sparse training (:mod:`surgery.pruning.sparsify`) before the cut, taken
    from the retraining budget (N sparse + budget - N retraining steps: the same total)."""

    text: str
    criterion: str
    distill: bool = False
    progressive: bool = False
    sparse: bool = False


TECHNIQUE_SUFFIXES = ("sparse", "distill", "progressive")


def parse_technique(text: str) -> Technique:
    parts = [p.strip() for p in text.split("+") if p.strip()]
    criteria = [p for p in parts if p not in TECHNIQUE_SUFFIXES]
    if len(criteria) != 1 or criteria[0] not in list_importances():
        raise RecipeError(
            f"sweep technique {text!r}: expected one ranking criterion ({', '.join(list_importances())}) "
            "optionally joined with '+sparse', '+distill' and/or '+progressive'"
        )
    return Technique(text=text, criterion=criteria[0], distill="distill" in parts, progressive="progressive" in parts,
                     sparse="sparse" in parts)


@dataclass
class SweepSection:
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    # fractions of the dense MACs to keep (each reached by searching the ratio, see prune.target_macs)
    target_macs: list[float] = field(default_factory=list)
    # fractions of the dense network latency to keep on prune.runtime (see prune.target_latency)
    target_latency: list[float] = field(default_factory=list)
    # ways to prune and recover, compared side by side: "criterion[+distill][+progressive]"
    # (l1, taylor+distill, l1+distill+progressive...); empty: prune.method alone
    techniques: list[str] = field(default_factory=list)
    sparsities: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.9])
    match_masked: bool = True  # add masked variants at the same parameter reduction as each ratio
    out: str = "runs/sweep"
    # deployment table (surgery.deployment.table): INT8 in ONNX Runtime for the dense control and the
    # structured variants ("all"), the one with the smallest MACs ("smallest"), or none
    int8: str = "none"
    qat_steps: int = 0  # > 0: also quantization-aware fine-tuning for that many steps, then INT8
    calib_batches: int = 8  # batches of training images calibrating INT8 post-training quantization
    # where the deployment table's files run: onnxruntime and/or openvino (the same files, f32 / INT8)
    deploy_runtimes: list[str] = field(default_factory=lambda: ["onnxruntime"])
    # the INT8 form: auto (each measured, the fastest kept) or one of surgery.deployment.quantize.FORMS
    int8_form: str = "auto"

    def validate(self) -> None:
        _check(all(0 < r < 1 for r in self.ratios), "ratios", "numbers strictly between 0 and 1")
        _check(bool(self.deploy_runtimes) and len(set(self.deploy_runtimes)) == len(self.deploy_runtimes)
               and set(self.deploy_runtimes) <= {"onnxruntime", "openvino"}, "deploy_runtimes",
               "a list of distinct runtimes among onnxruntime, openvino")
        _check(all(0 < t < 1 for t in self.target_latency), "target_latency", "fractions strictly between 0 and 1")
        _check(all(0 < s < 1 for s in self.sparsities), "sparsities", "numbers strictly between 0 and 1")
        _check(all(0 < t < 1 for t in self.target_macs), "target_macs", "fractions strictly between 0 and 1")
        for t in self.techniques:
            try:
                parse_technique(t)
            except RecipeError as e:
                raise _FieldError("techniques", str(e).split(": ", 1)[-1]) from None
        _check(bool(self.out.strip()), "out", "a folder path")
        _check(self.int8 in ("none", "smallest", "all"), "int8", "'none', 'smallest' or 'all'")
        _check(0 <= self.qat_steps <= 1_000_000, "qat_steps", "an integer >= 0")
        _check(1 <= self.calib_batches <= 10_000, "calib_batches", "an integer in [1, 10000]")
        _check(self.int8_form in INT8_FORMS, "int8_form", f"one of {', '.join(INT8_FORMS)}")


@dataclass
class Recipe:
    version: int = SCHEMA_VERSION
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    prune: PruneSection = field(default_factory=PruneSection)
    train: TrainSection = field(default_factory=TrainSection)  # dense baseline
    retrain: TrainSection = field(default_factory=lambda: TrainSection(steps=300, warmup_steps=20))
    bench: BenchSection = field(default_factory=BenchSection)
    sweep: SweepSection = field(default_factory=SweepSection)
    source: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        return d


# --------------------------------------------------------------------------------------------
# validation machinery


class _FieldError(Exception):
    def __init__(self, key: str, allowed: str, value: Any = None) -> None:
        super().__init__(key)
        self.key, self.allowed, self.value = key, allowed, value


def _check(ok: bool, key: str, allowed: str) -> None:
    if not ok:
        raise _FieldError(key, allowed)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except _FieldError as e:
                errors.append(e.allowed)
        raise _FieldError(key, " or ".join(errors + (["null"] if type(None) in args else [])), value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _FieldError(key, "a mapping", value)
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _FieldError(key, f"a list of {getattr(args[0], '__name__', args[0])}", value)
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _FieldError(key, "a mapping", value)
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _FieldError(key, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _FieldError(key, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _FieldError(key, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _FieldError(key, "a string", value)
        return value
    raise TypeError(f"unsupported recipe type {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    values = {}
    for k, v in data.items():
        if k not in fields:
            raise _FieldError(f"{prefix}{k}", f"one of: {', '.join(fields)}{did_you_mean(k, fields)}", v)
        values[k] = _convert(hints[k], v, f"{prefix}{k}")
    obj = cls(**values)
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except _FieldError as e:
            raise _FieldError(f"{prefix}{e.key}", e.allowed, getattr(obj, e.key.split(".")[0], None)) from None
    return obj


def _error(source: str, e: _FieldError) -> RecipeError:
    got = "" if e.value is None else f" (got {e.value!r})"
    key = f"'{e.key}'" if e.key.isprintable() else repr(e.key)  # a key with a newline stays one line
    return RecipeError(f"{source}: bad value for {key}{got}: expected {e.allowed}")


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping, got {type(data).__name__}")
    version = data.get("version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise RecipeError(f"{source}: recipe version {version!r} is not supported (this surgery reads {SCHEMA_VERSION})")
    try:
        recipe = _build(Recipe, data)
    except _FieldError as e:
        raise _error(source, e) from None
    recipe.source = source
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file (or a shipped recipe by name: ``quickstart``)."""
    path = find_recipe(path)
    raw = read_small_file(path, "recipe")  # stat first: a 3 GB or FIFO recipe is one line
    try:
        data = safe_yaml_load(raw, str(path))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if data is None or data == {}:
        raise RecipeError(f"recipe {path} is empty; give at least one section (model:, prune:, train: ...) or no --recipe")
    return recipe_from_dict(data, str(path))


# the prune fields that each say how much to cut: one set by a flag replaces the recipe's
PRUNE_AMOUNTS = ("ratio", "target_macs", "target_params", "target_latency")


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """Return a new recipe with dotted keys (``"prune.ratio"``) replaced; ``None`` values are ignored.

    An amount to cut given as an override (``prune.ratio``, ``prune.target_*``) replaces the
    recipe's amount instead of competing with it (a recipe's ``target_macs`` would otherwise win over
    ``--ratio``); a recipe's ``allocation: sensitivity``, which spreads a MACs budget, leaves a ratio,
    parameter or latency budget to the uniform allocation unless the overrides name it too."""
    data = recipe.to_dict()
    amounts = [k for k in PRUNE_AMOUNTS if overrides.get(f"prune.{k}") is not None]
    if amounts and isinstance(data.get("prune"), dict):
        section = data["prune"]
        for k in PRUNE_AMOUNTS:
            if k not in amounts:
                section.pop(k, None)
        if (section.get("allocation") == "sensitivity" and "target_macs" not in amounts
                and overrides.get("prune.allocation") is None):
            section["allocation"] = "uniform"
            section.pop("sensitivity", None)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return recipe_from_dict(data, recipe.source or "<recipe>")


FLAG_SOURCE = "command-line flags"


def check_flag_overrides(overrides: dict[str, Any]) -> None:
    """Validate the values flags set (``{"prune.ratio": 1.5}``) on their own, so an error blames the
    flag rather than the recipe file or ``<defaults>``."""
    data: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if data:
        recipe_from_dict(data, FLAG_SOURCE)
