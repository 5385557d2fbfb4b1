from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from effnet import build
from effnet.export import ONNX_TOLERANCE, export_onnx, onnx_difference
from tests.effnet.helpers import with_realistic_bn_stats


@pytest.mark.parametrize(("padding", "size"), [("symmetric", 224), ("same", 97)])
def test_onnxruntime_matches_pytorch(padding: str, size: int, tmp_path: Path) -> None:
    model = with_realistic_bn_stats(build("efficientnet_b0", padding=padding), size)
    model.train()  # export must switch to eval and the plain Swish by itself, then restore the mode
    path = export_onnx(model, tmp_path / "b0.onnx", resolution=size)
    assert model.training

    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "Conv" in ops and not any("Swish" in op for op in ops)
    # every spatial mean (16 squeeze-excites and the head) as the pool int8 runtimes have kernels for
    assert ops.count("GlobalAveragePool") == 17 and "ReduceSum" not in ops
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].shape == [1, 1000]
    assert onnx_difference(model, path, resolution=size) <= ONNX_TOLERANCE  # the check `model export` runs


def test_the_check_compares_what_the_file_computes(tmp_path: Path) -> None:
    model = with_realistic_bn_stats(build("efficientnet_b0", num_classes=10), 64)
    path = export_onnx(model, tmp_path / "b0.onnx", resolution=64)
    assert onnx_difference(model, path, resolution=64) <= ONNX_TOLERANCE
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # the file no longer computes what the model does
    assert onnx_difference(model, path, resolution=64) > ONNX_TOLERANCE
    torch.nn.init.zeros_(model.classifier.weight)
    torch.nn.init.zeros_(model.classifier.bias)
    assert onnx_difference(model, path, resolution=64) is None  # all-zero logits: nothing to compare


def test_failed_export_leaves_no_file(tmp_path: Path) -> None:
    model = build("efficientnet_b0")
    with pytest.raises(RuntimeError):
        export_onnx(model, tmp_path / "b0.onnx", resolution=-1)
    assert list(tmp_path.iterdir()) == []
