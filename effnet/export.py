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


def export_onnx(model: EfficientNet, path: str | Path, *, resolution: int | None = None, batch_size: int = 1) -> Path:
    """Write `model` (in eval mode, plain Swish) as one self-contained ONNX file.

    The input is (batch_size, 3, resolution, resolution), resolution defaulting to the variant's.
    The file appears whole or not at all.
    """
    path = Path(path)
    resolution = resolution or model.spec.resolution
    example = torch.randn(batch_size, IMAGE_CHANNELS, resolution, resolution)
    was_training = model.training
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamo=True, verbose=False
            )
        program.save(tmp, external_data=False)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        Path(tmp).unlink(missing_ok=True)
    return path
