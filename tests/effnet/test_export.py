from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from effnet import build
from effnet.export import INPUT_NAME, export_onnx
from tests.effnet.helpers import assert_close_relative, with_realistic_bn_stats


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
    x = torch.randn(1, 3, size, size)
    (onnx_logits,) = session.run(None, {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x)
    assert onnx_logits.shape == (1, 1000)
    assert_close_relative(torch.from_numpy(np.asarray(onnx_logits)), expected)


def test_failed_export_leaves_no_file(tmp_path: Path) -> None:
    model = build("efficientnet_b0")
    with pytest.raises(RuntimeError):
        export_onnx(model, tmp_path / "b0.onnx", resolution=-1)
    assert list(tmp_path.iterdir()) == []
