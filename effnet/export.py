"""ONNX export at a fixed input size."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from effnet.model import EfficientNet
from effnet.specs import IMAGE_CHANNELS

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ONNX_TOLERANCE = 1e-4  # ONNX Runtime's logits may differ from PyTorch's by this much of the largest


def export_onnx(model: EfficientNet, path: str | Path, *, resolution: int | None = None, batch_size: int = 1,
                dynamic_batch: bool = False) -> Path:
    """Write `model` (in eval mode, plain Swish) as one self-contained ONNX file.

    The input is (batch_size, 3, resolution, resolution), resolution defaulting to the variant's;
    with `dynamic_batch` any batch size. The file appears whole or not at all.
    """
    path = Path(path)
    resolution = resolution or model.spec.resolution
    if dynamic_batch:
        batch_size = max(batch_size, 2)  # torch.export would take a batch of 1 for a constant
    example = torch.randn(batch_size, IMAGE_CHANNELS, resolution, resolution)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    was_training = model.training
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=True, verbose=False,
                dynamic_shapes=dynamic_shapes,
            )
        _as_global_pools(program.model)
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        Path(tmp).unlink(missing_ok=True)
    return path


def _as_global_pools(model) -> None:
    """Each spatial mean, exported as ReduceSum × 1/(H·W), rewritten as GlobalAveragePool: the same
    numbers, and the op runtimes have layout-aware int8 kernels for. ONNX Runtime quantizes no ReduceSum:
    left as is, every squeeze-excite's input goes back to float and NCHW in an int8 model (a quarter of
    its time at 224 px)."""
    from onnxscript.rewriter import pattern, rewrite

    rule = pattern.RewriteRule(_sum_times_scale, _global_pool, _is_spatial_mean, name="spatial_mean_as_global_pool")
    rewrite(model, [rule])


def _sum_times_scale(op, x, axes, scale):
    return op.Mul(op.ReduceSum(x, axes, keepdims=0), scale)


def _global_pool(op, x, axes, scale):
    return op.Flatten(op.GlobalAveragePool(x), axis=1)


def _is_spatial_mean(context, x, axes, scale, **_) -> bool:
    shape, axes, scale = x.shape, axes.const_value, scale.const_value
    if shape is None or len(shape) != 4 or axes is None or scale is None or scale.size != 1:
        return False
    height, width = shape[2], shape[3]
    if not (isinstance(height, int) and isinstance(width, int)):
        return False
    spatial = sorted(int(axis) % 4 for axis in axes.numpy().ravel()) == [2, 3]
    return spatial and math.isclose(float(scale.numpy().ravel()[0]), 1 / (height * width), rel_tol=1e-6)


def onnx_difference(model: EfficientNet, path: str | Path, *, resolution: int, images: torch.Tensor | None = None,
                    threads: int | None = None) -> float | None:
    """How far ONNX Runtime's logits for the file at `path` are from `model`'s (in eval mode), as the largest
    difference over the largest logit: compare with ONNX_TOLERANCE. On random images unless given.

    Relative because an absolute bound passes whatever the file computes when logits are small; None when
    every PyTorch logit is 0 (a fresh classifier starts at zero), where agreeing logits prove nothing.
    """
    import onnxruntime

    images = torch.randn(1, IMAGE_CHANNELS, resolution, resolution) if images is None else images
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {INPUT_NAME: images.numpy()})
    was_training = model.training
    with torch.no_grad():
        torch_logits = model.eval()(images)
    model.train(was_training)
    largest = torch_logits.abs().max().item()
    if largest == 0:
        return None
    return (torch.from_numpy(onnx_logits) - torch_logits).abs().max().item() / largest
