"""Image transforms from `torchvision.transforms.v2`, switchable from the job spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # resize to resolution / 0.875, then center-crop: the reference eval recipe

Transform = Callable[[torch.Tensor], torch.Tensor]
BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class AugmentSpec(BaseModel):
    """Training augmentation; every part can be switched off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    horizontal_flip: bool = True
    policy: Literal["none", "randaugment", "autoaugment"] = "none"
    randaugment_magnitude: int = Field(default=9, ge=0, le=30, description="RandAugment's magnitude (of 31 bins)")
    random_erasing: float = Field(default=0.0, ge=0.0, le=1.0, description="probability per image")
    mixup_alpha: float = Field(default=0.0, ge=0.0)
    cutmix_alpha: float = Field(default=0.0, ge=0.0)

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_is_a_range_of_fractions(cls, scale: tuple[float, float]) -> tuple[float, float]:
        # torchvision would refuse it only when the first worker draws a crop, after the job started.
        low, high = scale
        if not 0 < low <= high <= 1:
            raise ValueError("give [min, max] fractions of the image's area, with 0 < min <= max <= 1")
        return scale


def train_transform(resolution: int, augment: AugmentSpec) -> Transform:
    """uint8 (3, H, W) → normalised float (3, resolution, resolution), randomly augmented."""
    steps: list[Transform] = [
        v2.RandomResizedCrop(resolution, scale=augment.crop_scale, antialias=True)
        if augment.random_resized_crop else v2.Resize((resolution, resolution), antialias=True)
    ]
    if augment.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.policy == "randaugment":
        steps.append(v2.RandAugment(magnitude=augment.randaugment_magnitude))
    elif augment.policy == "autoaugment":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if augment.random_erasing > 0:
        steps.append(v2.RandomErasing(p=augment.random_erasing))
    return v2.Compose(steps)


def eval_transform(resolution: int) -> Transform:
    """uint8 (3, H, W) → normalised float (3, resolution, resolution): resize, then center crop."""
    return v2.Compose([
        v2.Resize(round(resolution / EVAL_CROP_FRACTION), antialias=True),
        v2.CenterCrop(resolution),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def batch_mixer(augment: AugmentSpec, num_classes: int) -> BatchMixer | None:
    """MixUp and/or CutMix over a batch: (images, int labels) → (mixed images, soft labels)."""
    mixers = []
    if augment.mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=augment.mixup_alpha, num_classes=num_classes))
    if augment.cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=augment.cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
