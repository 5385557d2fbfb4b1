"""Register the student as a new MLflow model version, aliased `challenger`, with its lineage.

The version is the PyTorch model the student's job logged; the int8 and fp32 ONNX models and the
quantization report are logged beside it in the student's run (`deploy/`), and the version's tags
name them. Lineage tags: teacher run, dataset id, code version, pipeline run, quantization recipe;
figures: the quantize stage's and, when given, the evaluate stage's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import Field

from pipelines.registry import Gate, signed_points
from pipelines.stages.base import StageContext, StageInputs, StageOutputs

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
DEPLOY_FOLDER = "deploy"


class Inputs(StageInputs):
    model_name: str = Field(pattern=MODEL_NAME_PATTERN, description="the registered model")
    run_id: str = Field(min_length=1, description="the student's training run (its logged model)")
    quantized: str = Field(pattern=r"^s3://[^/]+/.+", description="a quantize stage's folder")
    teacher_run: str | None = Field(default=None, description="the teacher's run (lineage)")
    figures: dict[str, dict[str, float]] = Field(default_factory=dict,
                                                 description="an evaluate stage's figures, recorded as metrics")
    gate: Gate = Gate()


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
    from pipelines.registry import register_version

    tracking_uri = context.settings.mlflow_tracking_uri
    client = MlflowClient(tracking_uri)
    student = client.get_run(inputs.run_id)
    s3 = s3_access(context.settings)
    folder = inputs.quantized.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="compound-stage-") as directory:
        for name in (FP32_FILE, INT8_FILE, REPORT_FILE):
            s3.client().download_file(*split_s3_url(f"{folder}/{name}"), str(Path(directory) / name))
            client.log_artifact(inputs.run_id, str(Path(directory) / name), DEPLOY_FOLDER)
        report = json.loads((Path(directory) / REPORT_FILE).read_text())
    fp32, int8 = report["fp32"], report["int8"]
    metrics = {"fp32_top1": fp32["top1"], "int8_top1": int8["top1"], "majority_top1": int8["majority_top1"],
               "int8_change_points": (int8["top1"] - fp32["top1"]) * 100,  # signed: + is a gain
               "int8_latency_ms": int8["latency_ms"]["1"]["p50"], "int8_size_mb": int8["size_mb"],
               "fp32_size_mb": fp32["size_mb"]}
    metrics |= {f"{label}_{key}": value for label, values in inputs.figures.items() for key, value in values.items()}
    int8_uri = f"runs:/{inputs.run_id}/{DEPLOY_FOLDER}/{INT8_FILE}"
    tags = {"compound.pipeline": context.pipeline, "compound.pipeline_run": context.parent.run_id,
            "compound.student_run": inputs.run_id, "compound.teacher_run": inputs.teacher_run or "",
            "compound.dataset_id": student.data.tags.get(f"{DATASET_TAG_PREFIX}train", ""),
            CODE_VERSION_TAG: code_version(), "compound.quantization_recipe": report["recipe"]["name"],
            "compound.int8_onnx": int8_uri, "compound.fp32_onnx": f"runs:/{inputs.run_id}/{DEPLOY_FOLDER}/{FP32_FILE}"}
    version = register_version(tracking_uri, name=inputs.model_name, run_id=inputs.run_id, tags=tags,
                               metrics=metrics, gate=inputs.gate,
                               description=describe_version(inputs.figures, metrics, report["recipe"]["name"],
                                                            dataset=report["data"], pipeline_run=context.parent.url))
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
