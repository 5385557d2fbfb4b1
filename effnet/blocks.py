"""The MBConv block: inverted residual with depthwise conv and squeeze-excite."""

from __future__ import annotations

import torch
from torch import nn

from effnet.layers import ConvBnAct, SqueezeExcite, add_drop_path
from effnet.specs import SQUEEZE_RATIO, EfficientNetSpec, round_channels


class MBConv(nn.Module):
    """expand 1x1 → depthwise kxk → squeeze-excite → project 1x1 (+ residual with stochastic depth).

    Receives already-resolved channels, stride and drop-path rate; `spec` supplies only the
    model-wide padding convention and BatchNorm settings.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, expand_ratio: int, kernel_size: int, stride: int,
        drop_path_rate: float, spec: EfficientNetSpec,
    ) -> None:
        super().__init__()
        mid_channels = round_channels(in_channels, expand_ratio)
        self.expand = (
            ConvBnAct(in_channels, mid_channels, 1, spec=spec) if expand_ratio != 1 else nn.Identity()
        )
        self.depthwise = ConvBnAct(
            mid_channels, mid_channels, kernel_size, stride=stride, groups=mid_channels, spec=spec
        )
        self.se = SqueezeExcite(mid_channels, max(1, int(in_channels * SQUEEZE_RATIO)))
        self.project = ConvBnAct(mid_channels, out_channels, 1, spec=spec, activation=False)
        self.has_residual = stride == 1 and in_channels == out_channels
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if self.has_residual:
            # In place is safe: nothing keeps the projection's BatchNorm output for backward.
            out = add_drop_path(x, out, self.drop_path_rate, self.training)
        return out
