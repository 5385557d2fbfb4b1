import copy
import math

import pytest
import torch
import torch.nn.functional as F

from effnet.layers import (
    ConvBnAct,
    MemoryEfficientSwish,
    SameConv2d,
    _BatchNormSwishFunction,
    _SwishFunction,
    add_drop_path,
    make_conv,
    same_padding,
)
from effnet.specs import get_spec
from tests.effnet.helpers import separate_layers


def test_memory_efficient_swish_passes_gradcheck() -> None:
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwishFunction.apply, (x,))


def test_memory_efficient_swish_matches_plain_swish() -> None:
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    y_plain = x * torch.sigmoid(x)
    (g_plain,) = torch.autograd.grad(y_plain.sum(), x)
    y = MemoryEfficientSwish()(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_plain)
    torch.testing.assert_close(g, g_plain)


def _saved_tensor_bytes(fn, x: torch.Tensor) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x)
    distinct = {t.data_ptr(): t for t in saved}.values()  # one tensor may be saved by two ops
    return sum(t.numel() * t.element_size() for t in distinct)


def test_memory_efficient_swish_keeps_only_its_input_for_backward() -> None:
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    input_bytes = x.numel() * x.element_size()
    assert _saved_tensor_bytes(MemoryEfficientSwish(), x) == input_bytes
    assert _saved_tensor_bytes(lambda t: t * torch.sigmoid(t), x) == 2 * input_bytes  # the naive form


def test_memory_efficient_swish_uses_plain_form_without_grad() -> None:
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    with torch.no_grad():
        y = MemoryEfficientSwish()(x)
    assert y.grad_fn is None
    assert MemoryEfficientSwish()(x).grad_fn.name() == "_SwishFunctionBackward"


def _conv_bn_swish(momentum: float | None = 0.1) -> ConvBnAct:
    layer = ConvBnAct(6, 8, 3, stride=2, spec=get_spec("efficientnet_b0")).train()
    torch.nn.init.uniform_(layer.bn.weight, 0.5, 1.5)
    torch.nn.init.uniform_(layer.bn.bias, -0.5, 0.5)
    layer.bn.momentum = momentum
    return layer


def test_batch_norm_swish_passes_gradcheck() -> None:
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fn = lambda *t: _BatchNormSwishFunction.apply(*t, None, None, 0.1, 1e-5)
    assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_training_step_equals_separate_layers(momentum: float | None, memory_format: torch.memory_format) -> None:
    fused = _conv_bn_swish(momentum)
    reference = copy.deepcopy(fused)
    x = torch.randn(4, 6, 9, 9).contiguous(memory_format=memory_format).requires_grad_()
    for _ in range(2):  # the second step checks the running statistics' update rule too
        out, expected = fused(x), separate_layers(reference, x)
        grad = torch.randn_like(out)
        torch.testing.assert_close(out, expected)
        actual_grads = torch.autograd.grad(out, [x, *fused.parameters()], grad)
        expected_grads = torch.autograd.grad(expected, [x, *reference.parameters()], grad)
        for actual, wanted in zip(actual_grads, expected_grads, strict=True):
            torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)
    assert out.grad_fn.name() == "_BatchNormSwishFunctionBackward"
    for name, buffer in reference.bn.named_buffers():
        torch.testing.assert_close(getattr(fused.bn, name), buffer)


def test_fused_layer_keeps_one_activation_for_backward() -> None:
    layer = _conv_bn_swish()
    x = torch.randn(4, 6, 16, 16)
    conv_out_bytes = 4 * 8 * 8 * 8 * 4  # (N, C, H/2, W/2) float32
    # Both forms keep the conv's input and weight and BatchNorm's per-channel statistics besides.
    fixed = x.numel() * 4 + sum(p.numel() * 4 for p in layer.parameters())
    fused = _saved_tensor_bytes(layer, x) - fixed
    separate = _saved_tensor_bytes(lambda t: separate_layers(layer, t), x) - fixed
    assert conv_out_bytes <= fused < conv_out_bytes + 256
    assert separate >= 2 * conv_out_bytes


def test_fused_layer_under_bf16_autocast_tracks_fp32() -> None:
    layer = _conv_bn_swish()
    x = torch.randn(4, 6, 9, 9)
    expected = torch.autograd.grad(layer(x).square().sum(), layer.conv.weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    actual = torch.autograd.grad(out.float().square().sum(), layer.conv.weight)[0]
    assert (actual - expected).abs().max() / expected.abs().max() < 5e-2


def test_sync_batchnorm_conversion_keeps_the_swish() -> None:
    layer = _conv_bn_swish()
    layer(torch.randn(4, 6, 9, 9))  # some running statistics
    layer.eval()
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(layer)).eval()
    assert isinstance(converted.bn, torch.nn.SyncBatchNorm)
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), layer(x))
        assert converted(x).min() >= -0.279  # swish's minimum: the activation is still applied


@pytest.mark.parametrize("size", [1, 7, 8, 32, 33, 97, 224, 225])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (5, 2), (5, 1), (2, 2)])
def test_same_padding_gives_tensorflow_output_size(size: int, kernel: int, stride: int) -> None:
    before, after = same_padding(size, kernel, stride)
    assert 0 <= after - before <= 1  # TensorFlow puts the odd pixel after
    out = (size + before + after - kernel) // stride + 1
    assert out == math.ceil(size / stride)


def test_same_conv_matches_explicit_tensorflow_padding() -> None:
    conv = SameConv2d(3, 4, 3, stride=2, bias=False)
    x = torch.randn(1, 3, 9, 10)
    # TF SAME for 9 (k3, s2): total pad 2 -> (1, 1); for 10: total 1 -> (0, 1).
    expected = F.conv2d(F.pad(x, (0, 1, 1, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), expected)


def test_make_conv_uses_static_padding_where_conventions_agree() -> None:
    assert type(make_conv(8, 8, 3, stride=1, padding="same")) is torch.nn.Conv2d
    assert type(make_conv(8, 8, 3, stride=2, padding="same")) is SameConv2d
    assert type(make_conv(8, 8, 3, stride=2, padding="symmetric")) is torch.nn.Conv2d


def test_drop_path_drops_whole_samples_and_keeps_expectation() -> None:
    residual, branch = torch.full((4000, 3, 2, 2), 10.0), torch.ones(4000, 3, 2, 2)
    out = add_drop_path(residual, branch.clone(), 0.25, training=True) - residual
    per_sample = out.flatten(1)
    assert per_sample.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # whole samples only
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(add_drop_path(residual, branch.clone(), 0.25, training=False), residual + branch)


def test_drop_path_gradients_flow_to_both_inputs() -> None:
    residual = torch.randn(6, 2, 3, 3, requires_grad=True)
    branch = torch.randn(6, 2, 3, 3, requires_grad=True)
    add_drop_path(residual, branch, 0.5, training=True).sum().backward()
    assert torch.equal(residual.grad, torch.ones_like(residual))
    per_sample = branch.grad.flatten(1)
    assert set(per_sample[:, 0].tolist()) <= {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
