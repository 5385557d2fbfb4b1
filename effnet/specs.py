"""The EfficientNet family as typed data: the B0 stage table, the variant table, the scaling math.

Every per-variant number lives in `VARIANTS`; every per-stage number of the B0 baseline lives in
`B0_STAGES`. Both are the paper's Table 1 / Section 3.3 values, as torchvision builds them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

Padding = Literal["symmetric", "same"]
"""`symmetric`: PyTorch-style `(k - 1) // 2` on every side (torchvision and timm `efficientnet_bN`).
`same`: TensorFlow-style, asymmetric for strided convs (the original TF checkpoints, timm `tf_*`)."""

CHANNEL_DIVISOR = 8
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
IMAGE_CHANNELS = 3
SQUEEZE_RATIO = 0.25  # squeeze-excite width, as a fraction of the block's *input* channels


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One row of the B0 baseline table: `repeats` MBConv blocks with the same shape."""

    expand_ratio: int
    kernel_size: int
    stride: int
    out_channels: int
    repeats: int


B0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(expand_ratio=1, kernel_size=3, stride=1, out_channels=16, repeats=1),
    StageSpec(expand_ratio=6, kernel_size=3, stride=2, out_channels=24, repeats=2),
    StageSpec(expand_ratio=6, kernel_size=5, stride=2, out_channels=40, repeats=2),
    StageSpec(expand_ratio=6, kernel_size=3, stride=2, out_channels=80, repeats=3),
    StageSpec(expand_ratio=6, kernel_size=5, stride=1, out_channels=112, repeats=3),
    StageSpec(expand_ratio=6, kernel_size=5, stride=2, out_channels=192, repeats=4),
    StageSpec(expand_ratio=6, kernel_size=3, stride=1, out_channels=320, repeats=1),
)


@dataclasses.dataclass(frozen=True)
class EfficientNetSpec:
    """Everything needed to build one model; derive variations with `dataclasses.replace`."""

    name: str
    width_mult: float
    depth_mult: float
    resolution: int
    dropout: float
    num_params: int  # with the 1000-class head; a test checks the built model against it
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    drop_path_rate: float = 0.2
    num_classes: int = 1000
    padding: Padding = "symmetric"

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.padding not in ("symmetric", "same"):
            raise ValueError(f"padding must be 'symmetric' or 'same', got {self.padding!r}")

    def channels(self, base: int) -> int:
        return round_channels(base, self.width_mult)

    def repeats(self, base: int) -> int:
        return round_repeats(base, self.depth_mult)


# Resolutions are the paper's; dropout and BatchNorm settings are torchvision's (B5-B7 were ported
# from TensorFlow, whose momentum 0.99 is PyTorch's 0.01).
_TF_BN = {"bn_eps": 1e-3, "bn_momentum": 0.01}
VARIANTS: dict[str, EfficientNetSpec] = {
    spec.name: spec
    for spec in (
        EfficientNetSpec("efficientnet_b0", 1.0, 1.0, 224, 0.2, 5_288_548),
        EfficientNetSpec("efficientnet_b1", 1.0, 1.1, 240, 0.2, 7_794_184),
        EfficientNetSpec("efficientnet_b2", 1.1, 1.2, 260, 0.3, 9_109_994),
        EfficientNetSpec("efficientnet_b3", 1.2, 1.4, 300, 0.3, 12_233_232),
        EfficientNetSpec("efficientnet_b4", 1.4, 1.8, 380, 0.4, 19_341_616),
        EfficientNetSpec("efficientnet_b5", 1.6, 2.2, 456, 0.4, 30_389_784, **_TF_BN),
        EfficientNetSpec("efficientnet_b6", 1.8, 2.6, 528, 0.5, 43_040_704, **_TF_BN),
        EfficientNetSpec("efficientnet_b7", 2.0, 3.1, 600, 0.5, 66_347_960, **_TF_BN),
    )
}


def round_channels(channels: float, width_mult: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Scale `channels` by `width_mult` and round to a multiple of `divisor`, never below 90 %."""
    scaled = channels * width_mult
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return rounded


def round_repeats(repeats: int, depth_mult: float) -> int:
    """Scale a stage's block count by `depth_mult`, rounding up."""
    return math.ceil(repeats * depth_mult)


def get_spec(name: str) -> EfficientNetSpec:
    """The variant's spec; an unknown name raises listing the valid ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown EfficientNet variant {name!r}; valid: {', '.join(VARIANTS)}") from None
