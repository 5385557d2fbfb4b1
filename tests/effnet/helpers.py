"""Shared by the effnet tests: realistic BatchNorm statistics, relative closeness, unfused reference layers."""

import torch


def with_realistic_bn_stats(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """BatchNorm statistics measured on a batch, so eval-mode logits are far from zero."""
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
