"""Building blocks below the MBConv level: activations, padding, conv-bn-act, squeeze-excite."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effnet.specs import EfficientNetSpec, Padding


class _SwishFunction(torch.autograd.Function):
    """swish(x) = x * sigmoid(x), keeping only `x` for backward and recomputing the sigmoid.

    The naive `x * torch.sigmoid(x)` keeps both `x` and `sigmoid(x)` alive until backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        # d/dx [x * s(x)] = s * (1 + x * (1 - s)) with s recomputed from x. ATen's fused kernel
        # computes exactly this in one pass; spelled out in Python it takes five passes over memory.
        return torch.ops.aten.silu_backward(grad_output, x)


class Swish(nn.Module):
    """The plain form, for inference and export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class MemoryEfficientSwish(nn.Module):
    """Swish whose autograd saves only its input.

    The custom autograd function is used only when a gradient will be taken in eager mode; under
    no_grad, scripting, `torch.compile` tracing and ONNX/`torch.export` export the plain form runs,
    so exported graphs hold a single standard op and nobody has to toggle anything. When no
    gradient flows through it, it overwrites its input like `nn.SiLU(inplace=True)`: inside the
    network that input is always a fresh intermediate, and inference allocates one buffer less.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tracing = _is_tracing()
        if x.requires_grad and torch.is_grad_enabled() and not tracing:
            return _SwishFunction.apply(x)
        return F.silu(x, inplace=not (x.requires_grad or tracing))


def _is_tracing() -> bool:
    return (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
    )


def same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (before, after) for one spatial dim: output is ceil(size / stride)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size at run time.

    Works for any input size; under ONNX export at a fixed size the pads become constants.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        return super().forward(F.pad(x, (*pad_w, *pad_h)))


def make_conv(
    in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, groups: int = 1,
    padding: Padding, bias: bool = False,
) -> nn.Conv2d:
    """A conv whose padding keeps `ceil(size / stride)`, in the requested convention."""
    # With stride 1 and an odd kernel both conventions pad (k - 1) // 2 on every side, so the
    # static (faster, simpler to export) form serves both.
    if padding == "same" and (stride > 1 or kernel_size % 2 == 0):
        return SameConv2d(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias)
    return nn.Conv2d(
        in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
        groups=groups, bias=bias,
    )


class ConvBnAct(nn.Sequential):
    """conv → BatchNorm → optional swish; the conv has no bias because BatchNorm follows.

    Padding convention and BatchNorm eps/momentum come from the model's spec.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, spec: EfficientNetSpec,
        stride: int = 1, groups: int = 1, activation: bool = True,
    ) -> None:
        super().__init__()
        self.conv = make_conv(
            in_channels, out_channels, kernel_size, stride=stride, groups=groups, padding=spec.padding
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=spec.bn_eps, momentum=spec.bn_momentum)
        if activation:
            self.act = MemoryEfficientSwish()


class SqueezeExcite(nn.Module):
    """Channel attention: global pool → reduce → swish → expand → sigmoid gate."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = MemoryEfficientSwish()
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = F.adaptive_avg_pool2d(x, 1)  # (N, C, 1, 1)
        scale = self.expand(self.act(self.reduce(scale)))
        return x * torch.sigmoid(scale)


def add_drop_path(residual: torch.Tensor, branch: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """residual + stochastic depth(branch): whole samples of the branch are zeroed with probability
    `rate` and the survivors scaled by 1 / (1 - rate).

    One fused `addcmul` in training (a single pass and buffer, where mask-then-add takes two); in
    eval the branch, which nothing keeps for backward, takes the residual in place.
    """
    if not training or rate == 0.0:
        return branch.add_(residual)
    keep = 1.0 - rate
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep).div_(keep)
    return torch.addcmul(residual, branch, mask)
