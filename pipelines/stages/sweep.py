"""Sweep a job with Ray Tune (`jobs.sweep`); the best trial's checkpoint is the stage's output.

The sweep runs under the stage's name, its parent run nested under the pipeline run and its trials
under it. A resumed pipeline run resumes the sweep: finished trials stay finished.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field

from jobs.spec import SweepSpec, check_sweep, parse_spec
from pipelines.stages.base import SpecInputs, StageContext, StageOutputs
from pipelines.stages.train import MANIFEST_PATTERN, use_manifest, with_entries


class Inputs(SpecInputs):
    spec_field = "sweep"
    sweep: dict[str, Any] = Field(description="a sweep spec: a path (relative to the pipeline file) or inline")
    data: str | None = Field(default=None, pattern=MANIFEST_PATTERN,
                             description="the dataset manifest of every trial; default: the base job's")

    def spec(self, *, name: str, tracking: dict[str, Any]) -> SweepSpec:
        return sweep_spec(self, name=name, tracking=tracking)


class Outputs(StageOutputs):
    checkpoint: str = Field(description="the best trial's final checkpoint", examples=["s3://bucket/jobs/a/epoch0001"])
    run_id: str = Field(description="the best trial's MLflow run", examples=["0" * 32])
    value: float = Field(description="the best trial's value of the sweep's metric", examples=[0.5])
    sweep_run_id: str = Field(description="the sweep's parent run", examples=["0" * 32])


def sweep_spec(inputs: Inputs, *, name: str, tracking: dict[str, Any]) -> SweepSpec:
    data = copy.deepcopy(inputs.sweep)
    data["name"] = name
    job = data.get("job")
    if inputs.data is not None and isinstance(job, dict):
        use_manifest(job, inputs.data)
    data["tracking"] = with_entries(data.get("tracking"), tracking)  # the trials' runs go where the sweep's goes
    return check_sweep(parse_spec(SweepSpec, data, "sweep"), "sweep")


def run(inputs: Inputs, context: StageContext) -> Outputs:
    from jobs.sweep import run_sweep_job

    spec = inputs.spec(name=context.job_name, tracking=context.tracking(inputs.sweep.get("tracking")))
    outcome = run_sweep_job(spec, context.settings, source=f"pipeline {context.pipeline}, stage {context.stage}")
    best = outcome.best
    return Outputs(checkpoint=best["checkpoint"], run_id=best.get("mlflow_run_id") or "", value=best["value"],
                   sweep_run_id=outcome.parent.run_id)
