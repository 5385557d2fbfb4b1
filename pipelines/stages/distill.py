"""Distil a teacher into a student: a training job whose `distill.teacher` is the `teacher` input
(typically an earlier stage's checkpoint). The job's own `distill` section sets the rest (alpha,
temperature, feature distillation)."""

from __future__ import annotations

from pydantic import Field, model_validator

from jobs.spec import SpecError
from pipelines.stages import train
from pipelines.stages.base import StageContext
from pipelines.stages.train import Outputs, job_spec

__all__ = ["Inputs", "Outputs", "run"]


class Inputs(train.Inputs):
    teacher: str = Field(min_length=1, description="the teacher: a checkpoint folder, an MLflow model or a file")

    @model_validator(mode="after")
    def _a_valid_job(self) -> Inputs:
        try:
            job_spec(self, name="a-stage", tracking={}, teacher=self.teacher)
        except SpecError as error:  # one line per problem, each with its path in the stage's inputs
            raise ValueError("\n".join(f"job.{problem}" for problem in error.problems)) from None
        return self


def run(inputs: Inputs, context: StageContext) -> Outputs:
    spec = job_spec(inputs, name=context.job_name, tracking=context.tracking(inputs.job.get("tracking")),
                    teacher=inputs.teacher)
    return train.train(spec, context)
