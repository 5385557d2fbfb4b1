"""The same model on an NVIDIA GPU: channels_last, bf16/fp16 autocast. Skipped without CUDA."""

import copy

import pytest
import torch
import torch.nn.functional as F

from effnet import build
from effnet.layers import ConvBnAct, _SwishFunction
from effnet.specs import get_spec
from tests.effnet.helpers import as_if_trained, separate_layers, with_realistic_bn_stats

pytestmark = pytest.mark.gpu


def test_memory_efficient_swish_gradcheck_on_cuda() -> None:
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(_SwishFunction.apply, (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channels_last_autocast_matches_fp32(dtype: torch.dtype) -> None:
    model = with_realistic_bn_stats(build("efficientnet_b0", num_classes=10), 64)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    model = model.cuda().to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        actual = model(x.cuda().contiguous(memory_format=torch.channels_last)).float().cpu()
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() / scale < 5e-2


def test_training_step_under_autocast_gives_finite_gradients() -> None:
    model = as_if_trained(build("efficientnet_b0", num_classes=10)).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (8,), device="cuda"))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_batch_norm_swish_on_cuda_equals_separate_layers(dtype: torch.dtype) -> None:
    fused = ConvBnAct(16, 32, 3, stride=2, spec=get_spec("efficientnet_b0")).cuda().train()
    reference = copy.deepcopy(fused)
    x = torch.randn(8, 16, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = fused(x)
        expected = separate_layers(reference, x)
    assert out.grad_fn.name() == "_BatchNormSwishFunctionBackward"
    grads = torch.autograd.grad(out.float().square().sum(), list(fused.parameters()))
    expected_grads = torch.autograd.grad(expected.float().square().sum(), list(reference.parameters()))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for actual, wanted in zip(grads, expected_grads, strict=True):
        assert (actual - wanted).abs().max() <= tol * wanted.abs().max()
    torch.testing.assert_close(fused.bn.running_var, reference.bn.running_var, rtol=1e-3, atol=1e-5)
