"""Register the student as a new MLflow model version, aliased `challenger`, with its lineage.

The version is the PyTorch model the student's job logged; the int8 and fp32 ONNX models and the
quantization report are logged beside it in the student's run (`deploy/`), and the version's tags
name them. Lineage tags: teacher run, dataset id, code version, pipeline run, quantization recipe;
figures: the quantize stage's and, when given, the evaluate stage's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from pipelines.registry import Gate, signed_points
from pipelines.stages import quantize
from pipelines.stages.base import StageContext, StageInputs, StageOutputs

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
DEPLOY_FOLDER = "deploy"


class Inputs(StageInputs):
    model_name: str = Field(pattern=MODEL_NAME_PATTERN, description="the registered model")
    run_id: str = Field(min_length=1, description="the student's training run (its logged model)")
    quantized: quantize.Outputs = Field(description="a quantize stage's outputs: ${stages.NAME.outputs}")
    teacher_run: str | None = Field(default=None, description="the teacher's run (lineage)")
    figures: dict[str, dict[str, float]] = Field(default_factory=dict,
                                                 description="an evaluate stage's figures, recorded as metrics")
    gate: Gate = Gate()

    @field_validator("quantized", mode="before")
    @classmethod
    def _all_outputs(cls, value: Any) -> Any:
        if isinstance(value, str):  # what pipelines wrote before the figures came typed
            # A ValueError, not a TypeError: pydantic reports it as the input's problem.
            raise ValueError("takes all of a quantize stage's outputs, not one of them: write "  # noqa: TRY004
                             "${stages.NAME.outputs}, NAME the quantize stage")
        return value


class Outputs(StageOutputs):
    model_name: str = Field(examples=["model"])
    version: int = Field(examples=[1])
    model_uri: str = Field(examples=["models:/model/1"])
    int8_onnx: str = Field(examples=["runs:/0/deploy/model.int8.onnx"])


def run(inputs: Inputs, context: StageContext) -> Outputs:
    from mlflow import MlflowClient

    from cluster.storage import split_s3_url
    from jobs.quantize import FP32_FILE, INT8_FILE, REPORT_FILE
    from jobs.s3 import s3_access
    from jobs.tags import CODE_VERSION_TAG, DATASET_TAG_PREFIX
    from jobs.tracking import code_version
    from pipelines.registry import (
        DATASET_ID_TAG,
        FP32_ONNX_TAG,
        INT8_ONNX_TAG,
        PIPELINE_RUN_TAG,
        RECIPE_TAG,
        STUDENT_RUN_TAG,
        TEACHER_RUN_TAG,
        register_version,
    )
    from pipelines.stages.base import PIPELINE_TAG

    tracking_uri = context.settings.mlflow_tracking_uri
    client = MlflowClient(tracking_uri)
    student = client.get_run(inputs.run_id)
    quantized = inputs.quantized
    s3 = s3_access(context.settings).client()
    with tempfile.TemporaryDirectory(prefix="compound-stage-") as directory:  # the files go beside the student
        for name, uri in ((FP32_FILE, quantized.fp32_onnx), (INT8_FILE, quantized.int8_onnx),
                          (REPORT_FILE, quantized.report)):
            s3.download_file(*split_s3_url(uri), str(Path(directory) / name))
            client.log_artifact(inputs.run_id, str(Path(directory) / name), DEPLOY_FOLDER)
    metrics = {"fp32_top1": quantized.fp32_top1, "int8_top1": quantized.int8_top1,
               "majority_top1": quantized.majority_top1, "int8_change_points": quantized.change_points,
               "int8_latency_ms": quantized.int8_latency_ms, "int8_size_mb": quantized.int8_size_mb,
               "fp32_size_mb": quantized.fp32_size_mb}
    metrics |= {f"{label}_{key}": value for label, values in inputs.figures.items() for key, value in values.items()}
    int8_uri = f"runs:/{inputs.run_id}/{DEPLOY_FOLDER}/{INT8_FILE}"
    tags = {PIPELINE_TAG: context.pipeline, PIPELINE_RUN_TAG: context.parent.run_id, STUDENT_RUN_TAG: inputs.run_id,
            TEACHER_RUN_TAG: inputs.teacher_run or "",
            DATASET_ID_TAG: student.data.tags.get(f"{DATASET_TAG_PREFIX}train", ""),
            CODE_VERSION_TAG: code_version(), RECIPE_TAG: quantized.recipe, INT8_ONNX_TAG: int8_uri,
            FP32_ONNX_TAG: f"runs:/{inputs.run_id}/{DEPLOY_FOLDER}/{FP32_FILE}"}
    version = register_version(tracking_uri, name=inputs.model_name, run_id=inputs.run_id, tags=tags,
                               metrics=metrics, gate=inputs.gate,
                               description=describe_version(inputs.figures, metrics, quantized.recipe,
                                                            dataset=quantized.data, pipeline_run=context.parent.url))
    return Outputs(model_name=inputs.model_name, version=version, model_uri=f"models:/{inputs.model_name}/{version}",
                   int8_onnx=int8_uri)


def describe_version(figures: dict[str, dict[str, float]], metrics: dict[str, float], recipe: str, *, dataset: str,
                     pipeline_run: str) -> str:
    """The version's summary for its page in the MLflow UI (markdown): the evaluate stage's table and the
    int8 change."""
    lines = [f"Registered by pipeline run {pipeline_run}, trained on `{dataset}`.", ""]
    if figures:
        first = next(iter(figures))
        lines += [f"| model | top-1 | top-5 | agrees with {first} | latency b1 (ms) | size (MB) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for label, values in figures.items():
            agreement = values.get("agreement")
            lines.append(f"| {label} | {values['top1']:.1%} | {values['top5']:.1%} | "
                         f"{'-' if agreement is None else f'{agreement:.1%}'} | {values['latency_ms']:.2f} | "
                         f"{values['size_mb']:.1f} |")
        lines.append("")
    lines.append(f"Top-1 of int8 ({recipe}) against fp32: {signed_points(metrics['int8_change_points'])}. "
                 f"Always answering the most common class would score {metrics['majority_top1']:.1%}.")
    return "\n".join(lines)
