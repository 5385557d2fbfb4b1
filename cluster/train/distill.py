"""Knowledge distillation on the workers: a frozen teacher's soft targets (and, optionally, its stage
outputs) for the student a job trains.

The teacher is a plain module beside the student: in eval mode, without gradients, never wrapped in
DDP nor given to the optimiser (bf16 autocast on GPU). It sees the student's augmented crop, after
MixUp/CutMix, each resized to its own model's resolution (a consistent teacher: Beyer et al. 2022):
the loader crops at the larger of the two resolutions.

The job's driver pins the teacher as one file in the job's storage (`TEACHER_FILE`), so every
worker, and every restart, distils from the same weights whatever its source points at later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from cluster.data.loader import Batch
from cluster.train.config import DistillSpec, ModelSpec, TrainingSpec
from cluster.train.models import build_model

TEACHER_FILE = "teacher.safetensors"  # in <storage>/<job name>/
PINNED_FORMAT = "compound.pinned-model/1"


def teacher_url(spec: TrainingSpec) -> str:
    """Where a resolved job's driver pins its teacher: beside the job's checkpoints."""
    assert spec.checkpoint.storage is not None
    return f"{spec.checkpoint.storage.rstrip('/')}/{spec.name}/{TEACHER_FILE}"


@dataclass(frozen=True)
class PinnedModel:
    """What a pinned-model file (a teacher, a model to quantize) says of its model: it rebuilds from the file alone."""

    arch: str
    num_classes: int
    resolution: int
    source: str  # what the job spec named

    def model_spec(self) -> ModelSpec:
        return ModelSpec(arch=self.arch, num_classes=self.num_classes, resolution=self.resolution)


def save_pinned(state: dict[str, torch.Tensor], info: PinnedModel, path: str | Path) -> None:
    metadata = {"format": PINNED_FORMAT, "model": json.dumps(dataclasses.asdict(info))}
    safetensors.torch.save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(path),
                                metadata=metadata)


def pinned_info(path: str | Path) -> PinnedModel:
    with safetensors.safe_open(str(path), "pt") as file:
        metadata = file.metadata() or {}
    if metadata.get("format") != PINNED_FORMAT:
        raise ValueError(f"{path} is not a pinned compound model (format {metadata.get('format')!r})")
    return PinnedModel(**json.loads(metadata["model"]))


def load_pinned(path: str | Path, device: torch.device) -> tuple[nn.Module, PinnedModel]:
    """The pinned model, frozen in eval mode on `device`."""
    info = pinned_info(path)
    model = build_model(info.model_spec())
    model.load_state_dict(safetensors.torch.load_file(str(path)))
    return freeze(model).to(device), info


def freeze(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)) per sample, weighted like the label loss (mean over the nominal batch).

    T² keeps the soft targets' gradients on the scale of the label loss's whatever T (Hinton et al. 2015).
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    per_sample = F.kl_div(student, teacher, log_target=True, reduction="none").sum(dim=1)
    return (per_sample * weights).sum() / weights.numel() * temperature**2


def feature_loss(projected: dict[int, torch.Tensor], targets: dict[int, torch.Tensor],
                 weights: torch.Tensor) -> torch.Tensor:
    """Mean over the stages of each sample's MSE between the student's adapted stage output and the
    teacher's (resized to the student's feature map), weighted like the label loss."""
    total = weights.new_zeros(())
    for stage, student in projected.items():
        target = targets[stage].float()
        if target.shape[-2:] != student.shape[-2:]:
            target = F.interpolate(target, size=student.shape[-2:], mode="bilinear", antialias=True)
        per_sample = (student.float() - target).pow(2).flatten(1).mean(dim=1)
        total = total + (per_sample * weights).sum() / weights.numel()
    return total / len(projected)


class StageTaps:
    """Forward hooks keeping the outputs of an EfficientNet's chosen stages from its latest forward."""

    def __init__(self, model: nn.Module, stages: tuple[int, ...]) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        self._hooks = [model.stages[stage].register_forward_hook(self._keep(stage)) for stage in stages]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _keep(self, stage: int) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs.setdefault(stage, output)  # not again in activation checkpointing's recompute
        return hook


def stage_channels(model: nn.Module, stages: tuple[int, ...]) -> dict[int, int]:
    """The channels of each stage's output, from one small forward."""
    taps = StageTaps(model, stages)
    was_training = model.training
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device))
    model.train(was_training)
    taps.remove()
    return {stage: output.shape[1] for stage, output in taps.outputs.items()}


class StudentWithAdapters(nn.Module):
    """The student, plus a learned 1×1 convolution per distilled stage mapping its output to the teacher's
    channels. What DDP or DeepSpeed wraps, so the adapters train and sync with the student; calling it
    returns the student's logits, and `projected` holds the adapted stage outputs of a training forward."""

    def __init__(self, student: nn.Module, teacher_channels: dict[int, int]) -> None:
        super().__init__()
        stages = tuple(teacher_channels)
        own = stage_channels(student, stages)
        self.student = student
        self.adapters = nn.ModuleDict({str(stage): nn.Conv2d(own[stage], channels, 1, bias=False)
                                       for stage, channels in teacher_channels.items()})
        self._taps = StageTaps(student, stages)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._taps.outputs = {}
        return self.student(images)

    @property
    def projected(self) -> dict[int, torch.Tensor]:
        return {stage: self.adapters[str(stage)](output) for stage, output in self._taps.outputs.items()}


def student_of(module: nn.Module) -> nn.Module:
    """The student inside what the strategy trains."""
    return module.student if isinstance(module, StudentWithAdapters) else module


def student_state(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The student's weights out of the trained module's state dict (no adapters)."""
    if not isinstance(module, StudentWithAdapters):
        return state
    return {key.removeprefix("student."): value for key, value in state.items() if key.startswith("student.")}


class Distiller:
    """Per batch: the teacher's outputs on the crop, the student's view of it, and the combined loss."""

    def __init__(self, spec: DistillSpec, teacher: nn.Module, *, teacher_resolution: int, student_resolution: int,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.spec, self.teacher = spec, teacher
        self.teacher_resolution, self.student_resolution = teacher_resolution, student_resolution
        self.autocast = autocast
        features = spec.features
        self.teacher_taps = StageTaps(teacher, features.stages) if features is not None else None

    @property
    def crop_resolution(self) -> int:
        """What the training loader crops at: both models' inputs are resized from it."""
        return max(self.teacher_resolution, self.student_resolution)

    def teacher_channels(self) -> dict[int, int]:
        assert self.spec.features is not None
        return stage_channels(self.teacher, self.spec.features.stages)

    def prepare(self, batch: Batch, student: nn.Module,
                label_loss: Callable[[torch.Tensor, Batch], torch.Tensor]) -> tuple[Batch, Callable, torch.Tensor]:
        """(the student's batch, its loss function, how many of the batch's real samples the teacher
        labels right) for a training batch of crops."""
        with torch.no_grad(), self.autocast():
            if self.teacher_taps is not None:
                self.teacher_taps.outputs = {}
            teacher_logits = self.teacher(_resized(batch.images, self.teacher_resolution)).float()
        targets = dict(self.teacher_taps.outputs) if self.teacher_taps is not None else {}
        labels = batch.labels if batch.labels.ndim == 1 else batch.labels.argmax(dim=1)  # MixUp: the larger part
        teacher_hits = ((teacher_logits.argmax(dim=1) == labels) & (batch.weights > 0)).sum()
        student_batch = dataclasses.replace(batch, images=_resized(batch.images, self.student_resolution))
        spec = self.spec

        def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            total = (spec.alpha * label_loss(logits, batch)
                     + (1 - spec.alpha) * kd_loss(logits, teacher_logits, batch.weights, spec.temperature))
            if spec.features is not None:
                total = total + spec.features.weight * feature_loss(student.projected, targets, batch.weights)
            return total

        return student_batch, loss, teacher_hits


    def teacher_classes(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's top-1 class for each of the student's images (resized to the teacher's resolution):
        how often a distilled student agrees with its teacher on the validation split."""
        with torch.no_grad(), self.autocast():
            return self.teacher(_resized(images, self.teacher_resolution)).argmax(dim=1)


def _resized(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
