"""The training sections of a job spec: model, optimisation, precision, strategy, scaling,
checkpoints, failures and distillation. Each is a frozen pydantic model validated on construction; `jobs/spec.py`
assembles them (with the data and tracking sections) into a job spec.

Defaults that depend on the model (resolution, dropout, drop-path rate) are filled in when the
section is read, so a validated spec prints every value a run will use.
"""

from __future__ import annotations

import importlib
import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from cluster.data.spec import DataSpec
from effnet import VARIANTS
from effnet.specs import B0_STAGES

# The other architectures of the seed articles, trainable as teachers: torchvision builds them.
TORCHVISION_CLASSIFIERS = ("resnet50", "resnext50_32x4d", "densenet121", "mobilenet_v3_large")
TORCHVISION_RESOLUTION = 224
EFFICIENTNET_DROP_PATH_RATE = 0.2  # the reference recipe's stochastic depth
MODEL_NAMES = (*VARIANTS, *TORCHVISION_CLASSIFIERS)
JOB_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"  # a Ray submission id, a storage folder and an MLflow tag


class _Section(BaseModel):
    # No infinities or NaN: .inf passes a lower bound and would break every worker; .nan fails bounds misleadingly.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class ModelSpec(_Section):
    """What to train: an EfficientNet variant or a torchvision classifier, and how."""

    arch: str = Field(default="efficientnet_b0", description=f"one of {', '.join(MODEL_NAMES)}")
    num_classes: int | None = Field(default=None, ge=2, description="default: the dataset's classes")
    resolution: int | None = Field(default=None, ge=16, le=2048, description="input side; default: the model's")
    dropout: float | None = Field(default=None, ge=0, lt=1, description="before the classifier; default: the model's")
    drop_path_rate: float | None = Field(default=None, ge=0, lt=1, description="stochastic depth (EfficientNet)")
    bn_momentum: float | None = Field(default=None, gt=0, le=1, description=(
        "BatchNorm running-statistics momentum (EfficientNet); default: the variant's (B5-B7: 0.01, "
        "TensorFlow's, which takes thousands of steps to settle: short runs want 0.1)"))
    bn_recalibration_batches: int = Field(default=10, ge=0, le=10_000, description=(
        "before each evaluation and the saved weights, BatchNorm statistics are recomputed over this many "
        "training batches per worker with the weights as they are (0: keep the running averages)"))
    pretrained: str | None = Field(default=None, description="a local weights file (compound, torchvision or timm)")
    freeze_through_stage: int | None = Field(default=None, ge=-1, lt=len(B0_STAGES),
                                             description="freeze the stem (-1) and stages 0..k (EfficientNet)")
    activation_checkpointing: bool = Field(default=False, description="recompute each stage in backward (EfficientNet)")

    @model_validator(mode="before")
    @classmethod
    def _model_defaults(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        arch = values.get("arch", cls.model_fields["arch"].default)
        if not isinstance(arch, str):  # a mapping or list is no name: validation says so
            return values
        if arch in VARIANTS:
            variant = VARIANTS[arch]
            defaults = {"resolution": variant.resolution, "dropout": variant.dropout,
                        "drop_path_rate": EFFICIENTNET_DROP_PATH_RATE, "bn_momentum": variant.bn_momentum}
        elif arch in TORCHVISION_CLASSIFIERS:
            defaults = {"resolution": TORCHVISION_RESOLUTION}
        else:
            return values
        return {**values, **{key: value for key, value in defaults.items() if values.get(key) is None}}

    @model_validator(mode="after")
    def _known_arch_and_options(self) -> ModelSpec:
        if self.arch not in MODEL_NAMES:
            raise ValueError(f"arch {self.arch!r} is not a model compound trains; choose one of {', '.join(MODEL_NAMES)}")
        if not self.is_efficientnet:
            given = [name for name in ("dropout", "drop_path_rate", "bn_momentum", "freeze_through_stage")
                     if getattr(self, name) is not None] + (["activation_checkpointing"] if self.activation_checkpointing else [])
            if given:
                raise ValueError(f"{', '.join(given)} apply to EfficientNet variants only, not {self.arch}; remove them")
        return self

    @property
    def is_efficientnet(self) -> bool:
        return self.arch in VARIANTS


class OptimSpec(_Section):
    """Optimiser, learning-rate schedule (linear warm-up, then cosine to a floor) and regularisation."""

    optimizer: Literal["adamw", "sgd", "rmsprop"] = "adamw"
    lr: float = Field(default=1e-3, gt=0, le=10, description="peak learning rate")
    lr_reference_batch: int | None = Field(
        default=None, ge=1, description="scale lr by global batch / this (the linear scaling rule); unset: no scaling")
    final_lr_fraction: float = Field(default=0.01, ge=0, le=1, description="the cosine ends at lr × this")
    warmup_epochs: float = Field(default=0.0, ge=0)
    warmup_steps: int | None = Field(default=None, ge=0, description="instead of warmup_epochs")
    weight_decay: float = Field(default=0.05, ge=0, description="not applied to norms and biases")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd and rmsprop")
    nesterov: bool = Field(default=True, description="sgd, when momentum > 0")
    rmsprop_decay: float = Field(default=0.9, gt=0, lt=1)
    eps: float | None = Field(default=None, gt=0, description="default: 1e-8 (adamw), 1e-3 (rmsprop, as the paper)")
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    ema_decay: float | None = Field(default=None, gt=0, lt=1, description="keep an EMA of the weights, e.g. 0.9998")
    grad_clip_norm: float | None = Field(default=None, gt=0)
    grad_accumulation: int = Field(default=1, ge=1, le=1024, description="micro-batches per optimiser step")
    epochs: int = Field(default=10, ge=1, le=100_000)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _one_warmup_shorter_than_training(self) -> OptimSpec:
        if self.warmup_steps is not None and self.warmup_epochs:
            raise ValueError("give warmup_epochs or warmup_steps, not both")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs:g}) is not shorter than epochs ({self.epochs}): the "
                             "learning rate would never reach its peak; warm up for a fraction of the training")
        return self


class PrecisionSpec(_Section):
    dtype: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="fp16 needs GPUs")
    channels_last: bool = True


class DDPStrategy(_Section):
    name: Literal["ddp"] = "ddp"


# Parts of the DeepSpeed config that the spec decides, and the fields that decide them: an override of one
# would contradict the loop (which builds the optimiser and schedule, runs the accumulation and checkpoints
# activations itself) or the spec. The section of a two-part key may be tuned, as a mapping.
DEEPSPEED_KEYS_FROM_THE_SPEC = {
    ("train_micro_batch_size_per_gpu",): "data.batch_size",
    ("gradient_accumulation_steps",): "optim.grad_accumulation",
    ("train_batch_size",): "data.batch_size × scaling.num_workers × optim.grad_accumulation",
    ("managed_gradient_accumulation",): "the training loop",
    ("gradient_clipping",): "optim.grad_clip_norm",
    ("optimizer",): "optim",
    ("scheduler",): "optim",
    ("zero_optimization", "stage"): "strategy.zero_stage",
    ("bf16", "enabled"): "precision.dtype",
    ("fp16", "enabled"): "precision.dtype",
    ("data_types", "buffer_dtype"): "precision.dtype",
    ("bfloat16",): "precision.dtype",  # DeepSpeed's old name of the bf16 section
    ("amp",): "precision.dtype",
    ("torch_autocast",): "precision.dtype",
    ("activation_checkpointing",): "model.activation_checkpointing",
}
# Sections of the override DeepSpeed's own pydantic models check, so a misspelt key stops the spec, not
# every worker: section → (what DeepSpeed calls it, module, model).
DEEPSPEED_SECTION_MODELS = {
    "zero_optimization": ("ZeRO", "deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("bf16", "deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("fp16", "deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
}


class DeepSpeedStrategy(_Section):
    name: Literal["deepspeed"]
    zero_stage: Literal[1, 2, 3] = 2
    config: dict[str, Any] = Field(
        default_factory=dict, description="expert override: merged into the DeepSpeed config generated from the spec")

    @model_validator(mode="after")
    def _override_leaves_the_spec_alone(self) -> DeepSpeedStrategy:
        for path, owner in DEEPSPEED_KEYS_FROM_THE_SPEC.items():
            if path[0] not in self.config:
                continue
            section = self.config[path[0]]
            if len(path) == 1:
                raise ValueError(f"config.{path[0]} is set by {owner}; remove it from the override")
            if not isinstance(section, dict):
                raise ValueError(f"config.{path[0]} must be a mapping of DeepSpeed {path[0]} options, whose "  # noqa: TRY004
                                 f"{path[-1]} is set by {owner} (got {section!r})")
            if path[-1] in section:
                raise ValueError(f"config.{'.'.join(path)} is set by {owner}; remove it from the override")
        for section, model in DEEPSPEED_SECTION_MODELS.items():
            if section in self.config:
                _check_section(section, self.config[section], model,
                               {"stage": self.zero_stage} if section == "zero_optimization" else {})
        return self


def _check_section(section: str, options: dict[str, Any], model: tuple[str, str, str],
                   spec_part: dict[str, Any]) -> None:
    """An override section through DeepSpeed's own model of it (`DEEPSPEED_SECTION_MODELS`), with the part the
    spec sets put in."""
    label, module, name = model
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # importing DeepSpeed on a machine without GPUs warns that it found none
    try:
        checked = getattr(importlib.import_module(module), name)
    finally:
        logging.disable(previous)
    if not all(isinstance(key, str) for key in options):
        raise ValueError(f"config.{section}: its keys are DeepSpeed option names (got {list(options)!r})")
    try:
        checked(**options, **spec_part)
    except ValidationError as error:
        wrong = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"config.{section} is not a valid DeepSpeed {label} section: {wrong}") from None


Strategy = Annotated[DDPStrategy | DeepSpeedStrategy, Field(discriminator="name")]


class WorkerRange(_Section):
    """An elastic job's workers: it starts with what the cluster can give (at least `min`), shrinks when a node
    goes and grows back to `max` when one returns."""

    min: int = Field(ge=1, le=4096)
    max: int = Field(ge=1, le=4096)

    @model_validator(mode="after")
    def _ordered(self) -> WorkerRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")
        return self


def _workers_form(value: object) -> str:
    return "range" if isinstance(value, dict | WorkerRange) else "count"


# The tags pydantic puts into an error's path inside a field of two forms: a message leaves them out.
FORM_TAGS = ("count", "range")


class ScalingSpec(_Section):
    num_workers: Annotated[
        Annotated[int, Field(ge=1, le=4096), Tag("count")] | Annotated[WorkerRange, Tag("range")],
        Discriminator(_workers_form),
    ] = Field(default=2, description="a number, or {min, max} for an elastic job")
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, gt=0, description="with use_gpu")
    memory_per_worker_gb: float | None = Field(default=None, gt=0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources a worker takes, e.g. {spot: 1} for nodes so labelled")
    grow_check_s: float = Field(default=60.0, gt=0, le=3600,
                                description="how often an elastic job below its most workers looks for room to grow")

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, WorkerRange)

    @property
    def min_workers(self) -> int:
        return self.num_workers.min if isinstance(self.num_workers, WorkerRange) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers.max if isinstance(self.num_workers, WorkerRange) else self.num_workers

    @property
    def worker_resources(self) -> dict[str, float]:
        """What one worker takes from a node, in Ray's resource names (memory in bytes)."""
        resources = {**self.resources_per_worker, "CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        if self.memory_per_worker_gb is not None:
            resources["memory"] = self.memory_per_worker_gb * 2**30
        return resources


class CheckpointSpec(_Section):
    every_steps: int | None = Field(default=None, ge=1, description="also checkpoint every N steps")
    at_epoch_end: bool = True
    keep: int = Field(default=2, ge=1, description="checkpoints kept in storage")
    storage: str | None = Field(default=None, pattern=r"^s3://[^/]+(/.*)?$",
                                description="s3://bucket/prefix; default: the stack's checkpoints bucket")


class FailureSpec(_Section):
    max_failures: int = Field(default=3, ge=0, description="worker-group restarts before the job fails")
    max_preemptions: int = Field(default=-1, ge=-1, description="restarts after nodes were preempted or drained, "
                                 "counted apart from max_failures (-1: any number)")
    sigterm_grace_s: float = Field(default=30.0, gt=0, le=3600,
                                   description="a SIGTERM to a worker is a preemption notice: the process goes this "
                                   "long after it (Slurm's KillWait and Kubernetes' termination grace: 30 s)")


class FeatureDistillSpec(_Section):
    """Distil the teacher's stage outputs into the student's through learned 1×1 adapters (EfficientNets)."""

    stages: tuple[int, ...] = Field(default=(3, 4), min_length=1,
                                    description="EfficientNet stage indices (0–6) matched between the two models")
    weight: float = Field(default=1.0, gt=0, description="of the feature loss, added to the logit loss")

    @model_validator(mode="after")
    def _known_stages(self) -> FeatureDistillSpec:
        wrong = [stage for stage in self.stages if not 0 <= stage < len(B0_STAGES)]
        if wrong or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages {list(self.stages)}: give distinct EfficientNet stage indices in 0..{len(B0_STAGES) - 1}")
        return self


class DistillSpec(_Section):
    """Train the model as a student of a frozen teacher: loss = α·CE(labels) + (1−α)·T²·KL(teacher ‖ student)."""

    teacher: str = Field(min_length=1, description="a job's checkpoint folder on S3 (s3://…), an MLflow model "
                                                   "(models:/NAME@alias, runs:/ID/model), or a weights file")
    teacher_arch: str | None = Field(default=None, description="the teacher's model, when its file does not say")
    teacher_resolution: int | None = Field(default=None, ge=16, le=2048,
                                           description="the teacher's input side; default: what it was trained at")
    alpha: float = Field(default=0.25, ge=0, le=1, description="weight of the label loss (0.25: hard:soft 1:3)")
    temperature: float = Field(default=4.0, gt=0, le=100)
    features: FeatureDistillSpec | None = None

    @model_validator(mode="after")
    def _known_teacher_arch(self) -> DistillSpec:
        if self.teacher_arch is not None and self.teacher_arch not in MODEL_NAMES:
            raise ValueError(f"teacher_arch {self.teacher_arch!r} is not a model compound builds; "
                             f"choose one of {', '.join(MODEL_NAMES)}")
        return self


class TrainingSpec(_Section):
    """Everything a training run needs: what the workers and the trainer read."""

    name: str = Field(pattern=JOB_NAME_PATTERN, description="the job's identity: storage folder, Ray and MLflow")
    model: ModelSpec = ModelSpec()
    data: DataSpec
    optim: OptimSpec = OptimSpec()
    precision: PrecisionSpec = PrecisionSpec()
    strategy: Strategy = DDPStrategy()
    scaling: ScalingSpec = ScalingSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    failure: FailureSpec = FailureSpec()
    distill: DistillSpec | None = None

    @model_validator(mode="after")
    def _sections_agree(self) -> TrainingSpec:
        if self.precision.dtype == "fp16" and not self.scaling.use_gpu:
            raise ValueError("precision.dtype fp16 needs GPUs (scaling.use_gpu: true); on CPU use bf16 or fp32")
        deepspeed = isinstance(self.strategy, DeepSpeedStrategy)
        if deepspeed and self.strategy.zero_stage == 3 and self.optim.ema_decay is not None:
            raise ValueError("optim.ema_decay is not supported with ZeRO stage 3 (each rank holds a shard of the "
                             "weights); use zero_stage 1 or 2, or drop ema_decay")
        every = self.checkpoint.every_steps
        if every is not None and every % self.optim.grad_accumulation:
            raise ValueError(f"checkpoint.every_steps ({every}) must be a multiple of optim.grad_accumulation "
                             f"({self.optim.grad_accumulation}): checkpoints fall on optimiser steps")
        if self.scaling.elastic and deepspeed and (self.strategy.zero_stage == 3 or self.optim.optimizer != "adamw"):
            raise ValueError("an elastic scaling.num_workers with DeepSpeed needs zero_stage 1 or 2 and optim.optimizer "
                             "adamw (a resized job resumes from DeepSpeed's universal checkpoint, which holds those); "
                             "or use strategy ddp")
        if self.distill is not None and self.distill.features is not None and not self.model.is_efficientnet:
            raise ValueError(f"distill.features needs an EfficientNet student, not {self.model.arch}; "
                             "remove distill.features")
        return self

    @property
    def global_batch(self) -> int:
        """Samples per optimiser step: data.batch_size on each of the (most) workers, optim.grad_accumulation times."""
        return self.data.batch_size * self.scaling.max_workers * self.optim.grad_accumulation

    def accumulation_at(self, world_size: int) -> int:
        """Micro-batches per optimiser step on `world_size` workers: what keeps the global batch when an elastic
        job runs on fewer than its most (exactly when world_size divides max × grad_accumulation, else the
        next larger batch)."""
        return -(-self.scaling.max_workers * self.optim.grad_accumulation // world_size)

    def steps_per_epoch(self, train_samples: int) -> int:
        """Optimiser steps in an epoch over a split of `train_samples`, as the loop counts them on the most
        workers: each of the workers × loader_workers readers takes an equal share in batches, a step every
        grad_accumulation batches of its rank."""
        readers = max(1, self.data.loader_workers)
        share = -(-train_samples // (self.scaling.max_workers * readers))
        batches = -(-share // self.data.batch_size) * readers
        return -(-batches // self.optim.grad_accumulation)

    def warmup_problem(self, train_samples: int) -> str | None:
        """Why optim.warmup_steps outlast the run on a split of `train_samples`; None if they do not. (The
        steps are known once the dataset is; warmup_epochs is checked with the spec.)"""
        per_epoch = self.steps_per_epoch(train_samples)
        total = per_epoch * self.optim.epochs
        if self.optim.warmup_steps is None or self.optim.warmup_steps < total:
            return None
        return (f"optim.warmup_steps: {self.optim.warmup_steps}, but the run takes {total} optimiser steps "
                f"({self.optim.epochs} optim.epochs of {per_epoch}): the learning rate would never reach its peak; "
                "warm up for fewer steps")

    @property
    def peak_lr(self) -> float:
        reference = self.optim.lr_reference_batch
        return self.optim.lr * (self.global_batch / reference if reference else 1.0)
