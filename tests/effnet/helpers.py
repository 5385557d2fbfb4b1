"""Shared by the effnet tests: weights that make every layer count, realistic BatchNorm statistics,
relative closeness, unfused reference layers."""

import torch
from torch import nn


def as_if_trained(model: nn.Module) -> nn.Module:
    """A fresh EfficientNet has a zero classifier and residual blocks that start as the identity (it starts
    at chance, by design): its logits are all 0 and its body gets no gradient. Tests that compare outputs or
    gradients give it a random head and random BatchNorm scales first, so every layer shows in the logits."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5)
    return model


def with_realistic_bn_stats(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """BatchNorm statistics measured on a batch (and weights `as_if_trained`), so eval-mode logits are far from zero."""
    as_if_trained(model)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average
    with torch.no_grad():
        model(torch.randn(2, 3, size, size))
    return model.eval()


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """Equal within `tol` of the largest reference logit (random-weight logits can be large)."""
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=tol)


def separate_layers(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A `ConvBnAct` run as its three layers one after another, never fused: the reference."""
    return layer.act(layer.bn(layer.conv(x)))
