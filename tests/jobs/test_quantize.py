"""`compound model quantize | evaluate` against the real local stack: a B0 trained here on the digits,
calibrated on its training shards and evaluated on the validation shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from mlflow import MlflowClient

import effnet
from cluster.data.loader import ShardLoader
from cluster.data.manifest import ShardManifest
from cluster.data.transforms import AugmentSpec
from cluster.evaluate import predict, split_batches
from cluster.quantize import RECIPES, QuantizationError, top1
from cluster.storage import S3Access
from compound.cli import cli
from effnet.weights import save_checkpoint
from infra.settings import Settings
from infra.stack import Stack
from jobs.evaluate import evaluate_models
from jobs.model_source import ModelRef
from jobs.quantize import FP32_FILE, INT8_FILE, REPORT_FILE, quantize_model

DATA = "s3://shards/digits/manifest.json"
RESOLUTION = 32
EPOCHS = 4


@pytest.fixture(scope="module")
def trained_b0(digits: ShardManifest, s3: S3Access, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A B0 trained for a few epochs at 32 px (well above chance), as a compound checkpoint file. In
    channels_last, as jobs train: on CPU, 2.4 times the steps a second of the default layout."""
    torch.manual_seed(0)
    model = effnet.build("efficientnet_b0", num_classes=10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    loader = ShardLoader(digits, "train", batch_size=32, resolution=RESOLUTION, s3=s3, loader_workers=1,
                         augment=AugmentSpec(crop_scale=(0.5, 1.0), horizontal_flip=False))
    model.train()
    for epoch in range(EPOCHS):
        loader.load_state_dict({"epoch": epoch, "step": 0})
        for batch in loader:
            images = batch.images.contiguous(memory_format=torch.channels_last)
            loss = (F.cross_entropy(model(images), batch.labels, reduction="none") * batch.weights).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return save_checkpoint(model.eval(), tmp_path_factory.mktemp("b0") / "b0.safetensors")


def test_quantize_keeps_a_trained_b0_within_the_limit_and_logs_the_evaluation(
    stack: Stack, settings: Settings, s3: S3Access, digits: ShardManifest, trained_b0: Path, tmp_path: Path,
) -> None:
    client = MlflowClient(settings.mlflow_tracking_uri)
    run = client.create_run(client.create_experiment("quantize-test"))
    out = tmp_path / "b0-int8"
    result = CliRunner().invoke(cli, ["model", "quantize", str(trained_b0), "--data", DATA, "--out", str(out),
                                      "--resolution", str(RESOLUTION), "--max-drop", "1.0",
                                      "--run", run.info.run_id, "--home", str(stack.home)])
    assert result.exit_code == 0, result.output
    assert "kept recipe" in result.output and "ONNX Runtime, 2 threads" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([FP32_FILE, INT8_FILE, REPORT_FILE])
    import json

    report = json.loads((out / REPORT_FILE).read_text())
    fp32, int8 = report["fp32"], report["int8"]
    assert fp32["top1"] > 0.5, "the model was not trained"
    assert (fp32["top1"] - int8["top1"]) * 100 <= 1.0
    attempts = report["attempts"]
    assert attempts[-1]["recipe"] == report["recipe"]["name"] and attempts[-1]["drop_points"] <= 1.0
    assert all(a["drop_points"] > 1.0 for a in attempts[:-1])  # the first recipe within the limit is kept
    assert int8["size_mb"] < 0.4 * fp32["size_mb"]
    assert int8["agreement"] >= 0.9 and set(int8["latency_ms"]) == {"1", "32"}
    # The figures are the written models' (predicted once, while choosing the recipe), and the kept attempt's
    assert int8["top1"] == attempts[-1]["top1"]
    validation = list(split_batches(digits, "val", resolution=RESOLUTION, s3=s3))
    assert [top1(predict(out / name, validation, 2), validation) for name in (FP32_FILE, INT8_FILE)] == \
        pytest.approx([fp32["top1"], int8["top1"]], abs=1 / fp32["samples"])

    logged = client.get_run(run.info.run_id).data.metrics
    assert logged["fp32_top1"] == pytest.approx(fp32["top1"]) and logged["int8_top1"] == pytest.approx(int8["top1"])
    assert "int8_latency_b32_p50_ms" in logged and "int8_agreement" in logged
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion_fp32.png", "evaluation/confusion_int8.png", f"evaluation/{REPORT_FILE}"} <= artifacts


def test_an_impossible_limit_fails_and_writes_nothing(settings: Settings, s3: S3Access, trained_b0: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(QuantizationError, match="no recipe kept top-1 within -100"):
        quantize_model(ModelRef(str(trained_b0), resolution=RESOLUTION), data=DATA, out=out, max_drop_points=-100,
                       calibration_batches=2, threads=2, s3=s3, tracking_uri=settings.mlflow_tracking_uri,
                       recipes=RECIPES[-2:])
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging left behind
    # (two recipes are enough to show it: the ladder is walked whole in the test above)


def test_evaluate_scores_the_fp32_export_as_pytorch_does(stack: Stack, settings: Settings, s3: S3Access,
                                                         digits: ShardManifest, trained_b0: Path,
                                                         tmp_path: Path) -> None:
    from effnet.export import export_onnx

    model = effnet.weights.load_checkpoint(trained_b0).eval()
    onnx_path = export_onnx(model, tmp_path / "b0.onnx", resolution=RESOLUTION, dynamic_batch=True)
    (evaluation,) = evaluate_models([onnx_path], data=DATA, split="val", threads=2, s3=s3,
                                    tracking_uri=settings.mlflow_tracking_uri)
    hits, top5, count = 0, 0, 0
    with torch.no_grad():
        for batch in ShardLoader(digits, "val", batch_size=32, resolution=RESOLUTION, s3=s3, shuffle=False):
            real = batch.weights > 0
            ranked = model(batch.images)[real].topk(5, dim=1).indices
            labels = batch.labels[real]
            hits += int((ranked[:, 0] == labels).sum())
            top5 += int((ranked == labels[:, None]).any(dim=1).sum())
            count += int(real.sum())
    assert evaluation.samples == count == digits.split("val").samples
    assert evaluation.top1 == pytest.approx(hits / count, abs=1 / count)  # at most one borderline image apart
    assert evaluation.top5 == pytest.approx(top5 / count, abs=1 / count)
    assert evaluation.confusion.sum() == count and np.trace(evaluation.confusion) == round(evaluation.top1 * count)

    result = CliRunner().invoke(cli, ["model", "evaluate", str(onnx_path), "--data", DATA, "--home", str(stack.home)])
    assert result.exit_code == 0, result.output
    assert f"{evaluation.top1:.4f}" in result.output
    result = CliRunner().invoke(cli, ["model", "evaluate", str(onnx_path), "--data", "s3://shards/none/manifest.json",
                                      "--home", str(stack.home)])
    assert result.exit_code == 1 and "s3://shards/none/manifest.json" in result.output
