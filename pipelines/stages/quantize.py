"""Export a trained model to ONNX and quantize it to int8 within an accuracy limit (`jobs.quantize`).

The fp32 and int8 models and the quantization report go to the stage's folder on S3; the figures
(top-1 of each, the drop, latency, size) and confusion matrices to the stage's own MLflow run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import Field

from pipelines.stages.base import StageContext, StageInputs, StageOutputs
from pipelines.stages.train import MANIFEST_PATTERN

MODEL_INPUTS = ("model",)  # model sources, checked before the pipeline runs


class Inputs(StageInputs):
    model: str = Field(min_length=1, description="what to quantize: a checkpoint folder, an MLflow model or a file")
    data: str = Field(pattern=MANIFEST_PATTERN, description="calibrate on its train split, judge on its val split")
    max_drop: float = Field(default=1.0, ge=0, le=100, description="the most top-1 points int8 may lose")
    calibration_batches: int = Field(default=8, ge=1, le=1024)
    threads: int = Field(default=2, ge=1, le=256, description="ONNX Runtime threads for evaluation and latency")


class Outputs(StageOutputs):
    folder: str = Field(description="the S3 folder of the fp32 and int8 models and the report",
                        examples=["s3://bucket/pipelines/p/run/int8"])
    int8_onnx: str = Field(examples=["s3://bucket/pipelines/p/run/int8/model.int8.onnx"])
    fp32_onnx: str = Field(examples=["s3://bucket/pipelines/p/run/int8/model.fp32.onnx"])
    report: str = Field(description="quantization.json: every recipe tried", examples=["s3://b/p/quantization.json"])
    data: str = Field(description="the dataset manifest it was judged on", examples=["s3://shards/d/manifest.json"])
    recipe: str = Field(examples=["int8-all"])
    fp32_top1: float = Field(examples=[0.9])
    int8_top1: float = Field(examples=[0.9])
    change_points: float = Field(description="int8 top-1 − fp32 top-1, in points: + is a gain", examples=[-0.3])
    int8_latency_ms: float = Field(description="batch 1, median", examples=[1.0])
    int8_size_mb: float = Field(examples=[1.0])
    fp32_size_mb: float = Field(examples=[1.0])
    majority_top1: float = Field(description="top-1 of always answering the most common class", examples=[0.1])
    run_id: str = Field(description="the stage's MLflow run", examples=["0" * 32])


def run(inputs: Inputs, context: StageContext) -> Outputs:
    from cluster.storage import split_s3_url
    from jobs.model_source import ModelRef
    from jobs.quantize import FP32_FILE, INT8_FILE, REPORT_FILE, quantize_model
    from jobs.s3 import s3_access
    from jobs.tracking import finish_run

    s3 = s3_access(context.settings)
    run_ref = context.child_run()
    try:
        with tempfile.TemporaryDirectory(prefix="compound-stage-") as directory:
            out = Path(directory) / "out"
            outcome = quantize_model(ModelRef(inputs.model), data=inputs.data, out=out,
                                     max_drop_points=inputs.max_drop, calibration_batches=inputs.calibration_batches,
                                     threads=inputs.threads, s3=s3, tracking_uri=context.settings.mlflow_tracking_uri,
                                     run_id=run_ref.run_id)
            bucket, prefix = split_s3_url(context.storage)
            for name in (FP32_FILE, INT8_FILE, REPORT_FILE):
                s3.client().upload_file(str(out / name), bucket, f"{prefix}/{name}")
    except BaseException:
        finish_run(run_ref, status="FAILED", required=False)
        raise
    finish_run(run_ref, status="FINISHED")
    fp32, int8 = outcome.fp32, outcome.int8
    return Outputs(folder=context.storage, int8_onnx=f"{context.storage}/{INT8_FILE}",
                   fp32_onnx=f"{context.storage}/{FP32_FILE}", report=f"{context.storage}/{REPORT_FILE}",
                   data=inputs.data, recipe=outcome.recipe.name, fp32_top1=fp32.top1, int8_top1=int8.top1,
                   change_points=(int8.top1 - fp32.top1) * 100, int8_latency_ms=int8.latency_ms[1]["p50"],
                   int8_size_mb=int8.size_mb, fp32_size_mb=fp32.size_mb, majority_top1=int8.majority_top1,
                   run_id=run_ref.run_id)
