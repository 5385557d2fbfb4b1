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


MODEL_INPUTS = ("models",)  # model sources (or ONNX files), checked before the pipeline runs


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
    from jobs.evaluate import evaluate_side_by_side, log_evaluations, manifest_at
    from jobs.tracking import finish_run

    s3 = _s3(context)
    manifest = manifest_at(inputs.data, s3)
    run_ref = context.child_run()
    try:
        with tempfile.TemporaryDirectory(prefix="compound-stage-") as directory:
            models = {label: _onnx(source, Path(directory) / label, len(manifest.classes), context)
                      for label, source in inputs.models.items()}
            evaluations = evaluate_side_by_side(models, manifest, split=inputs.split, threads=inputs.threads, s3=s3)
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


def _onnx(source: str, folder: Path, num_classes: int, context: StageContext) -> Path:
    """The model as an ONNX file in `folder` (exported at the input side it was trained at)."""
    from botocore.exceptions import ClientError

    from cluster.storage import is_not_found, split_s3_url
    from cluster.train.distill import load_pinned
    from effnet.export import export_onnx
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
        _check_onnx(path, f"models.{folder.name}: {source}")
        return path
    import torch

    pinned, info = fetch_model(ModelRef(source), num_classes, s3=_s3(context),
                               tracking_uri=context.settings.mlflow_tracking_uri, out=folder)
    model, _ = load_pinned(pinned, device=torch.device("cpu"))
    return export_onnx(model, folder / "model.onnx", resolution=info.resolution, dynamic_batch=True)


def _s3(context: StageContext):
    from jobs.s3 import s3_access

    return s3_access(context.settings)


def _check_onnx(path: Path, what: str) -> None:
    """A file that is not an ONNX model is named, not reported as protobuf's parse error."""
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and friends: a corrupt or partial file
        raise ValueError(f"{what} is not an ONNX model ({str(error).splitlines()[0][:200]})") from None
