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


class ConvBnAct(nn.Module):
    """conv → BatchNorm → optional swish; the conv has no bias because BatchNorm follows.

    Padding convention and BatchNorm eps/momentum come from the model's spec. In training the
    BatchNorm and swish run as one memory-efficient step (`batch_norm_swish`); `bn` and `act` stay
    ordinary modules, so state dicts, `SyncBatchNorm` conversion and BatchNorm utilities see the
    usual layers (a converted `SyncBatchNorm` runs unfused).
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
        self.act = MemoryEfficientSwish() if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.act is None:
            return self.bn(x)
        if _can_fuse(self.bn):
            return batch_norm_swish(x, self.bn)
        return self.act(self.bn(x))

    def borrowed_parameters(self) -> list[nn.Parameter]:
        """The child's parameters this forward uses without calling the child: the fused BatchNorm's.

        Sharding schemes that gather a module's parameters around its own forward and backward (ZeRO-3)
        must gather these for this module.
        """
        return [p for p in (self.bn.weight, self.bn.bias) if p is not None]


def _can_fuse(bn: nn.Module) -> bool:
    return (
        type(bn) is nn.BatchNorm2d and bn.training and bn.affine
        and torch.is_grad_enabled() and not _is_tracing()
    )


class _BatchNormSwishFunction(torch.autograd.Function):
    """swish(batch_norm(x)) with batch statistics, keeping only `x` and the statistics for backward.

    Run as two layers, BatchNorm keeps its input and swish keeps BatchNorm's output: two
    activations per layer. Here backward recomputes the normalised output from `x` in one
    multiply-add pass, so the forward swish runs in place and the second activation never exists.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None, momentum: float, eps: float,
    ) -> torch.Tensor:
        out, mean, invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        return F.silu(out, inplace=True)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, mean, invstd = ctx.saved_tensors
        # BatchNorm's output again, per channel c: y = x * scale[c] + shift[c]   (N, C, H, W)
        scale = invstd * weight
        shift = bias - mean * scale
        per_channel = (1, -1) + (1,) * (x.ndim - 2)
        y = torch.addcmul(shift.to(x.dtype).view(per_channel), x, scale.to(x.dtype).view(per_channel))
        grad_y = torch.ops.aten.silu_backward.grad_input(grad_output, y, grad_input=y)  # y is not needed after
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3])
        )
        return grad_x, grad_weight, grad_bias, None, None, None, None


def batch_norm_swish(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """`swish(bn(x))` for an affine BatchNorm in training mode, updating its running statistics
    exactly as `bn(x)` would, while keeping one activation for backward instead of two."""
    momentum = bn.momentum
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d defines it
            momentum = 1.0 / float(bn.num_batches_tracked)
    return _BatchNormSwishFunction.apply(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum or 0.0, bn.eps
    )


class SqueezeExcite(nn.Module):
    """Channel attention: global pool → reduce → swish → expand → sigmoid gate.

    `reduce` and `expand` are 1x1 convs, as in the reference checkpoints, but on a pooled
    (N, C) vector they run as plain matrix products: a conv call on a 1x1 image costs many times more.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = MemoryEfficientSwish()
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = spatial_mean(x)  # (N, C)
        scale = F.linear(scale, _as_matrix(self.reduce.weight), self.reduce.bias)
        scale = F.linear(self.act(scale), _as_matrix(self.expand.weight), self.expand.bias)
        return x * torch.sigmoid(scale)[..., None, None]

    def borrowed_parameters(self) -> list[nn.Parameter]:
        """The children's parameters this forward uses without calling them (see `ConvBnAct`)."""
        return [*self.reduce.parameters(), *self.expand.parameters()]


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv's (out, in, 1, 1) weight as an (out, in) matrix, by a view whose gradient comes back with
    the weight's own strides.

    Both layouts hold a 1x1 kernel in the same order; only the strides of the size-1 dimensions tell them
    apart, and DDP compares strides exactly ("Grad strides do not match bucket view strides": a warning and
    a copy into its buckets). `flatten` hands back default strides, so a channels_last weight goes through
    the permutation that undoes its own.
    """
    if weight.stride(2) == 1:  # default strides: (in, 1, 1, 1)
        return weight.flatten(1)
    return weight.permute(0, 2, 3, 1).flatten(1)  # channels_last: (in, 1, in, in)


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) → (N, C) average over H and W.

    Written as sum × 1/(H·W) so that backward hands out a broadcast view of the (N, C) gradient
    instead of a full-size tensor: `mean` would allocate and fill one (N, C, H, W) buffer.
    """
    return x.sum((-2, -1)) * (1.0 / (x.shape[-2] * x.shape[-1]))


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
