"""Distillation's parts on one process: the KD loss by hand, what the teacher sees, that it never trains,
the feature adapters, and the distill section's validation. The distillation job on the cluster is in
tests/jobs/test_distill_job.py."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

import effnet
from cluster.data.loader import Batch
from cluster.train.config import DistillSpec, TrainingSpec
from cluster.train.distill import (
    Distiller,
    PinnedModel,
    StudentWithAdapters,
    freeze,
    kd_loss,
    load_pinned,
    save_pinned,
    student_state,
)
from cluster.train.loop import weighted_loss
from cluster.train.strategy import make_strategy
from tests.effnet.helpers import as_if_trained

DATA = {"train": {"manifest": "s3://shards/d/manifest.json", "split": "train"},
        "val": {"manifest": "s3://shards/d/manifest.json", "split": "val"}, "batch_size": 2}


def _batch(images: torch.Tensor, labels: list[int], weights: list[float]) -> Batch:
    return Batch(images=images, labels=torch.tensor(labels), weights=torch.tensor(weights),
                 keys=tuple(f"k{i}" for i in range(len(labels))), bad_keys=())


def _label_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    return weighted_loss(logits, batch, 0.1)


def test_kd_loss_matches_a_hand_computed_value() -> None:
    # s/T = [0.5, 0] and t/T = [0, 0.5]: softmaxes (σ(½), σ(−½)) and back, so
    # KL(t ‖ s) = (σ(½) − σ(−½))·½ = ½·tanh(¼); × T² = 4; the padding sample counts 0 of the nominal 2.
    student = torch.tensor([[1.0, 0.0], [5.0, -3.0]])
    teacher = torch.tensor([[0.0, 1.0], [-2.0, 9.0]])
    loss = kd_loss(student, teacher, torch.tensor([1.0, 0.0]), temperature=2.0)
    assert loss.item() == pytest.approx(4 * 0.5 * math.tanh(0.25) / 2, rel=1e-6)
    assert kd_loss(teacher, teacher, torch.ones(2), temperature=3.0).item() == pytest.approx(0.0, abs=1e-7)


class Recorder(nn.Module):
    """A 'teacher' that remembers its input and predicts fixed logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits, self.seen = logits, None
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen = images.clone()
        return self.logits * self.scale


@pytest.mark.parametrize(("teacher_res", "student_res"), [(48, 32), (32, 48), (32, 32)])
def test_the_teacher_sees_the_students_crop_at_its_own_resolution(teacher_res: int, student_res: int) -> None:
    teacher = freeze(Recorder(torch.tensor([[0.0, 2.0], [1.0, 0.0]])))
    distiller = Distiller(DistillSpec(teacher="t", alpha=0.25, temperature=2.0), teacher,
                          teacher_resolution=teacher_res, student_resolution=student_res,
                          autocast=contextlib.nullcontext)
    crop_res = distiller.crop_resolution
    assert crop_res == max(teacher_res, student_res)
    crop = torch.randn(2, 3, crop_res, crop_res)
    batch = _batch(crop, [1, 0], [1.0, 1.0])
    student_batch, loss_fn, teacher_hits = distiller.prepare(batch, nn.Identity(), _label_loss)
    assert teacher_hits.item() == 2  # the teacher says [1, 0]
    # Padding does not count, nor does a wrong answer; after MixUp the larger part is the label.
    assert distiller.prepare(_batch(crop, [1, 1], [0.0, 1.0]), nn.Identity(), _label_loss)[2].item() == 0
    mixed = dataclasses.replace(batch, labels=torch.tensor([[0.3, 0.7], [0.6, 0.4]]))
    assert distiller.prepare(mixed, nn.Identity(), _label_loss)[2].item() == 2

    def resized(resolution: int) -> torch.Tensor:
        if resolution == crop_res:
            return crop
        return F.interpolate(crop, size=(resolution, resolution), mode="bilinear", antialias=True)

    torch.testing.assert_close(teacher.seen, resized(teacher_res), rtol=0, atol=0)
    torch.testing.assert_close(student_batch.images, resized(student_res), rtol=0, atol=0)
    assert student_batch.labels is batch.labels and student_batch.weights is batch.weights
    logits = torch.tensor([[0.5, 0.1], [0.2, 0.3]])
    expected = (0.25 * weighted_loss(logits, batch, 0.1)
                + 0.75 * kd_loss(logits, teacher.logits, batch.weights, 2.0))
    torch.testing.assert_close(loss_fn(logits, student_batch), expected)


def _spec(**changes) -> TrainingSpec:
    return TrainingSpec(**{"name": "kd", "model": {"arch": "efficientnet_b0", "num_classes": 3, "resolution": 32},
                           "data": DATA, "distill": {"teacher": "t"}, **changes})


def test_the_teacher_gets_no_gradient_and_no_optimizer_state() -> None:
    spec = _spec(optim={"optimizer": "adamw", "lr": 0.1})
    teacher = freeze(effnet.build("efficientnet_b0", num_classes=3))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = effnet.build("efficientnet_b0", num_classes=3)
    strategy = make_strategy(student, spec, torch.device("cpu"))
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = Distiller(spec.distill, teacher, teacher_resolution=32, student_resolution=32,
                          autocast=contextlib.nullcontext)
    batch, loss_fn, _ = distiller.prepare(_batch(torch.randn(2, 3, 32, 32), [0, 2], [1.0, 1.0]), strategy.module,
                                          _label_loss)
    strategy.module.train()
    strategy.micro_step(batch, loss_fn, sync=True)
    strategy.optimizer_step(0.1)

    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}
    assert set(strategy.optimizer.state) <= set(student.parameters())
    assert not teacher.training
    for key, value in teacher.state_dict().items():  # BatchNorm statistics included: eval mode throughout
        torch.testing.assert_close(value, teacher_before[key], rtol=0, atol=0)
    assert any(not torch.equal(v, student_before[k]) for k, v in student.state_dict().items())


def test_feature_adapters_train_with_the_student_and_stay_out_of_its_weights() -> None:
    spec = _spec(distill={"teacher": "t", "features": {"stages": [3, 4], "weight": 1.0}})
    teacher = freeze(effnet.build("efficientnet_b1", num_classes=3))
    distiller = Distiller(spec.distill, teacher, teacher_resolution=32, student_resolution=32,
                          autocast=contextlib.nullcontext)
    channels = distiller.teacher_channels()
    student = as_if_trained(effnet.build("efficientnet_b0", num_classes=3))
    wrapped = StudentWithAdapters(student, channels)
    strategy = make_strategy(wrapped, spec, torch.device("cpu"))
    wrapped.train()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(wrapped.eval()(images), student(images))
    wrapped.train()
    batch, loss_fn, _ = distiller.prepare(_batch(images, [0, 1], [1.0, 1.0]), wrapped,
                                          _label_loss)
    strategy.micro_step(batch, loss_fn, sync=True)
    projected = wrapped.projected
    assert {stage: t.shape[1] for stage, t in projected.items()} == channels
    assert all(adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
               for adapter in wrapped.adapters.values())
    optimised = {id(p) for group in strategy.optimizer.param_groups for p in group["params"]}
    assert {id(a.weight) for a in wrapped.adapters.values()} <= optimised

    weights = student_state(wrapped.state_dict(), wrapped)
    plain = effnet.build("efficientnet_b0", num_classes=3)
    plain.load_state_dict(weights)  # strict: the student's keys, no adapters


def test_a_pinned_teacher_rebuilds_frozen(tmp_path) -> None:
    model = as_if_trained(effnet.build("efficientnet_b0", num_classes=4))
    info = PinnedModel(arch="efficientnet_b0", num_classes=4, resolution=40, source="models:/t@champion")
    save_pinned(model.state_dict(), info, tmp_path / "teacher.safetensors")
    teacher, read = load_pinned(tmp_path / "teacher.safetensors", torch.device("cpu"))
    assert read == info and not teacher.training
    images = torch.randn(1, 3, 40, 40)
    torch.testing.assert_close(teacher(images), model.eval()(images))


@pytest.mark.parametrize(("changes", "message"), [
    ({"distill": {"teacher": "t", "teacher_arch": "efficientnet_b9"}}, "teacher_arch 'efficientnet_b9'"),
    ({"distill": {"teacher": "t", "alpha": 1.5}}, "alpha"),
    ({"distill": {"teacher": "t", "temperature": 0}}, "temperature"),
    ({"distill": {"teacher": "t", "features": {"stages": [7]}}}, "stage indices in 0..6"),
    ({"distill": {"teacher": "t", "features": {"stages": [3, 3]}}}, "distinct"),
    ({"distill": {"teacher": ""}}, "teacher"),
    ({"distill": {"teacher": "t", "features": {}}, "model": {"arch": "resnet50", "num_classes": 3}},
     "needs an EfficientNet student"),
])
def test_a_wrong_distill_section_is_refused_naming_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainingSpec(**{"name": "kd", "model": {"num_classes": 3}, "data": DATA, **changes})
