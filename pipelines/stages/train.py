"""Train a job on the Ray cluster: the job spec of the `job` input, named and tracked as the pipeline's.

A resumed pipeline run launches the same job again, which continues from its latest checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field

from jobs.spec import JobSpec, parse_spec
from pipelines.stages.base import SpecInputs, StageContext, StageOutputs

MANIFEST_PATTERN = r"^s3://[^/]+/.+"


class Inputs(SpecInputs):
    spec_field = "job"
    job: dict[str, Any] = Field(description="a job spec: a path (relative to the pipeline file) or inline")
    data: str | None = Field(default=None, pattern=MANIFEST_PATTERN,
                             description="the dataset manifest for training and validation; default: the job's")

    def spec(self, *, name: str, tracking: dict[str, Any]) -> JobSpec:
        return job_spec(self, name=name, tracking=tracking)


class Outputs(StageOutputs):
    job: str = Field(description="the training job's name", examples=["pipeline-stage-0a1b2c"])
    checkpoint: str = Field(description="the job's final checkpoint folder", examples=["s3://bucket/jobs/a/epoch0001"])
    run_id: str = Field(description="the job's MLflow run (its logged model)", examples=["0" * 32])
    val_top1: float | None = Field(description="the last epoch's validation top-1", examples=[0.5])


def job_spec(inputs: Inputs, *, name: str, tracking: dict[str, Any], teacher: str | None = None) -> JobSpec:
    """The stage's job: the input spec under the stage's name, data and tracking (`SpecError` if invalid)."""
    data = copy.deepcopy(inputs.job)
    data["name"] = name
    if inputs.data is not None:
        use_manifest(data, inputs.data)
    if teacher is not None:
        data["distill"] = with_entries(data.get("distill"), {"teacher": teacher})
    data["tracking"] = with_entries(data.get("tracking"), tracking)
    return parse_spec(JobSpec, data, "job")


def with_entries(section: Any, entries: dict[str, Any]) -> Any:
    """A spec section (a mapping, or absent) with `entries` put in; anything else is left for validation to name."""
    if section is None:
        return dict(entries)
    return {**section, **entries} if isinstance(section, dict) else section


def use_manifest(job: dict[str, Any], manifest: str) -> None:
    """Point a job mapping's training and validation splits at `manifest` (in place; what is missing stays
    missing, for validation to name)."""
    loading = job.get("data")
    if isinstance(loading, dict):
        for split in ("train", "val"):
            if isinstance(loading.get(split), dict):
                loading[split] = {**loading[split], "manifest": manifest}


def train(spec: JobSpec, context: StageContext) -> Outputs:
    from jobs.driver import run_job

    outcome = run_job(spec, context.settings, source=f"pipeline {context.pipeline}, stage {context.stage}")
    if outcome.checkpoint is None:
        raise RuntimeError(f"job {spec.name} ended without a checkpoint")
    last = outcome.history[-1] if outcome.history else {}
    return Outputs(job=spec.name, checkpoint=outcome.checkpoint, run_id=outcome.run.run_id,
                   val_top1=last.get("val_top1"))


def run(inputs: Inputs, context: StageContext) -> Outputs:
    return train(inputs.spec(name=context.job_name, tracking=context.tracking(inputs.job.get("tracking"))), context)
