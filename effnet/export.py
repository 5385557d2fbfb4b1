"""ONNX export at a fixed input size."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from effnet.model import EfficientNet
from effnet.specs import IMAGE_CHANNELS

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


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
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        Path(tmp).unlink(missing_ok=True)
    return path
