"""Distil a teacher into a student: a training job whose `distill.teacher` is the `teacher` input
(typically an earlier stage's checkpoint). The job's own `distill` section sets the rest (alpha,
temperature, feature distillation)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from jobs.spec import JobSpec
from pipelines.stages import train
from pipelines.stages.base import StageContext
from pipelines.stages.train import Outputs, job_spec

__all__ = ["MODEL_INPUTS", "Inputs", "Outputs", "run"]


MODEL_INPUTS = ("teacher",)  # model sources, checked before the pipeline runs


class Inputs(train.Inputs):
    teacher: str = Field(min_length=1, description="the teacher: a checkpoint folder, an MLflow model or a file")

    def spec(self, *, name: str, tracking: dict[str, Any]) -> JobSpec:
        return job_spec(self, name=name, tracking=tracking, teacher=self.teacher)


def run(inputs: Inputs, context: StageContext) -> Outputs:
    return train.train(inputs.spec(name=context.job_name, tracking=context.tracking(inputs.job.get("tracking"))),
                       context)
