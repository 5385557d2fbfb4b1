"""The EfficientNet network, built from an `EfficientNetSpec`."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from effnet.blocks import MBConv
from effnet.layers import ConvBnAct, spatial_mean
from effnet.specs import B0_STAGES, HEAD_CHANNELS, IMAGE_CHANNELS, STEM_CHANNELS, EfficientNetSpec, get_spec

STEM_STRIDE = 2
FEATURE_STRIDES = (4, 8, 16, 32)  # the pyramid levels a detection neck consumes


class EfficientNet(nn.Module):
    """stem → 7 stages of MBConv blocks → 1x1 head conv → pool → dropout → linear.

    Layout: `stem`, `stages[i][j]` (MBConv), `head`, `classifier`.
    """

    def __init__(self, spec: EfficientNetSpec) -> None:
        super().__init__()
        self.spec = spec
        stem_channels = spec.channels(STEM_CHANNELS)
        self.stem = ConvBnAct(IMAGE_CHANNELS, stem_channels, 3, stride=STEM_STRIDE, spec=spec)

        # Stochastic depth grows linearly from 0 at the first block to just under the rate at the last.
        total_blocks = sum(spec.repeats(stage.repeats) for stage in B0_STAGES)
        stages, stage_strides = [], []
        in_channels, stride, block_index = stem_channels, STEM_STRIDE, 0
        for stage in B0_STAGES:
            out_channels = spec.channels(stage.out_channels)
            blocks = []
            for repeat in range(spec.repeats(stage.repeats)):
                blocks.append(MBConv(
                    in_channels, out_channels, expand_ratio=stage.expand_ratio, kernel_size=stage.kernel_size,
                    stride=stage.stride if repeat == 0 else 1,
                    drop_path_rate=spec.drop_path_rate * block_index / total_blocks, spec=spec,
                ))
                in_channels, block_index = out_channels, block_index + 1
            stride *= stage.stride
            stages.append(nn.Sequential(*blocks))
            stage_strides.append(stride)
        self.stages = nn.ModuleList(stages)
        self.stage_strides = tuple(stage_strides)
        # The last stage at each stride is the one whose output a feature pyramid taps.
        self.feature_stages = {s: max(i for i, st in enumerate(stage_strides) if st == s) for s in FEATURE_STRIDES}
        self.feature_channels = {s: spec.channels(B0_STAGES[i].out_channels) for s, i in self.feature_stages.items()}

        self.num_features = spec.channels(HEAD_CHANNELS)
        self.head = ConvBnAct(in_channels, self.num_features, 1, spec=spec)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(self.num_features, spec.num_classes)
        self.frozen_through = -2  # no stage frozen (-1 would be the stem alone)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images → (N, num_features, H/32, W/32) head feature map."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images → (N, num_classes) logits."""
        x = spatial_mean(self.forward_features(x))
        return self.classifier(self.dropout(x))

    def feature_maps(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Multi-scale features for a detection backbone: {stride: (N, C, H/stride, W/stride)}."""
        taps = {i: s for s, i in self.feature_stages.items()}
        maps = {}
        x = self.stem(x)
        for index, stage in enumerate(self.stages[: max(taps) + 1]):
            x = stage(x)
            if index in taps:
                maps[taps[index]] = x
        return maps

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` (transfer learning)."""
        self.spec = dataclasses.replace(self.spec, num_classes=num_classes)
        self.classifier = nn.Linear(self.num_features, num_classes).to(self.classifier.weight.device)
        _init_weights(self.classifier)

    def freeze(self, through_stage: int) -> None:
        """Stop training the stem and stages 0..`through_stage` (-1: stem only).

        Frozen parts get no gradient and their BatchNorm statistics stay fixed in train mode.
        """
        if not -1 <= through_stage < len(self.stages):
            raise ValueError(f"through_stage must be in [-1, {len(self.stages) - 1}], got {through_stage}")
        self.frozen_through = through_stage
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> EfficientNet:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_through < -1:
            return []
        return [self.stem, *self.stages[: self.frozen_through + 1]]


def _init_weights(module: nn.Module) -> None:
    # The reference initialisation (torchvision's), so fresh models train like the reference.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        bound = 1.0 / math.sqrt(module.out_features)
        nn.init.uniform_(module.weight, -bound, bound)
        nn.init.zeros_(module.bias)


def build(name: str, **overrides: object) -> EfficientNet:
    """Build a variant by name, e.g. `build("efficientnet_b3", num_classes=10, padding="same")`.

    `overrides` are `EfficientNetSpec` fields (num_classes, dropout, drop_path_rate, padding,
    bn_eps, bn_momentum); an unknown name or field raises listing the valid ones.
    """
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec)} - {"name", "num_params", "width_mult", "depth_mult"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for build(); valid: {', '.join(sorted(fields))}")
    return EfficientNet(dataclasses.replace(spec, **overrides))
