"""Evaluate models side by side on one split: top-1, top-5, agreement with the first, latency and size.

A model is an ONNX file (local or on S3, e.g. a quantize stage's output) or any model source a teacher
may be (a checkpoint folder, an MLflow model, a weights file), exported to ONNX at the resolution it
was trained at. The figures and confusion matrices go to the stage's own MLflow run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import Field, field_validator

from pipelines.stages.base import StageContext, StageInputs, StageOutputs
from pipelines.stages.train import MANIFEST_PATTERN

LABEL_PATTERN = r"^[a-z0-9_]{1,32}$"


class Inputs(StageInputs):
    models: dict[str, str] = Field(min_length=1, description="label → model; the first is the reference")
    data: str = Field(pattern=MANIFEST_PATTERN)
    split: str = Field(default="val", min_length=1)
    threads: int = Field(default=2, ge=1, le=256)

    @field_validator("models")
    @classmethod
    def _labels(cls, models: dict[str, str]) -> dict[str, str]:
        import re

        bad = [label for label in models if not re.match(LABEL_PATTERN, label)]
        if bad:
            raise ValueError(f"labels are lowercase letters, digits and _ (they name MLflow metrics); got {bad}")
        return models


class Outputs(StageOutputs):
    figures: dict[str, dict[str, float]] = Field(
        description="label → top1, top5, latency_ms (batch 1, median), latency_b32_ms, size_mb; and but for the "
                    "first, agreement (top-1 equal to the first model's)",
        examples=[{"student": {"top1": 0.9}}])
    run_id: str = Field(description="the stage's MLflow run", examples=["0" * 32])


def run(inputs: Inputs, context: StageContext) -> Outputs:
    from cluster.data.manifest import load_manifest
    from cluster.evaluate import evaluate, split_batches
    from jobs.deploy import log_evaluations
    from jobs.tracking import finish_run

    s3 = _s3(context)
    manifest = load_manifest(inputs.data, s3=s3)[0]
    run_ref = context.child_run()
    evaluations, batches, reference = {}, {}, None
    try:
        with tempfile.TemporaryDirectory(prefix="compound-stage-") as directory:
            for label, source in inputs.models.items():
                path, resolution = _onnx(source, Path(directory) / label, len(manifest.classes), context)
                if resolution not in batches:
                    batches[resolution] = list(split_batches(manifest, inputs.split, resolution=resolution, s3=s3))
                evaluation, logits = evaluate(path, batches[resolution], num_classes=len(manifest.classes),
                                              threads=inputs.threads, reference=reference)
                reference = logits if reference is None else reference
                evaluations[label] = evaluation
            log_evaluations(context.settings.mlflow_tracking_uri, run_ref.run_id, evaluations, manifest.classes)
    except BaseException:
        finish_run(run_ref, status="FAILED", required=False)
        raise
    finish_run(run_ref, status="FINISHED")
    figures = {label: {"top1": e.top1, "top5": e.top5, "latency_ms": e.latency_ms[1]["p50"],
                       "latency_b32_ms": e.latency_ms[32]["p50"], "size_mb": e.size_mb,
                       **({"agreement": e.agreement} if e.agreement is not None else {})}
               for label, e in evaluations.items()}
    return Outputs(figures=figures, run_id=run_ref.run_id)


def _onnx(source: str, folder: Path, num_classes: int, context: StageContext) -> tuple[Path, int]:
    """The model as an ONNX file in `folder`, and its input side."""
    from botocore.exceptions import ClientError

    from cluster.storage import is_not_found, split_s3_url
    from cluster.train.distill import load_pinned
    from effnet.export import export_onnx
    from jobs.deploy import input_resolution
    from jobs.model_source import ModelRef, fetch_model

    folder.mkdir(parents=True)
    if source.endswith(".onnx"):
        path = folder / "model.onnx"
        if source.startswith("s3://"):
            try:
                _s3(context).client().download_file(*split_s3_url(source), str(path))
            except ClientError as error:
                if is_not_found(error):
                    raise FileNotFoundError(f"models.{folder.name}: no object at {source}") from None
                raise
        else:
            path = Path(source).expanduser()
        return path, input_resolution(path)
    import torch

    pinned, info = fetch_model(ModelRef(source), num_classes, s3=_s3(context),
                               tracking_uri=context.settings.mlflow_tracking_uri, out=folder)
    model, _ = load_pinned(pinned, device=torch.device("cpu"))
    return export_onnx(model, folder / "model.onnx", resolution=info.resolution, dynamic_batch=True), info.resolution


def _s3(context: StageContext):
    from jobs.connect import s3_access

    return s3_access(context.settings)
