"""What every stage shares: the base of its inputs and outputs, and the context the runner hands it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from cluster.tracking import RunRef
from infra.settings import Settings
from jobs.spec import SpecError
from jobs.tags import PARENT_TAG

PIPELINE_TAG = "compound.pipeline"  # on the pipeline's parent run and every stage's run: the pipeline's name
STAGE_TAG = "compound.stage"  # on a stage's run: the stage's name
PIPELINE_STORAGE_PREFIX = "pipelines"  # s3://<checkpoints bucket>/pipelines/<name>/<run>/<stage>/


class StageInputs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SpecInputs(StageInputs):
    """Inputs that make a job or sweep spec (`spec`, from the input named by `spec_field`): they are
    valid when that spec is, so a pipeline is refused at validation, not when its stage starts."""

    spec_field: ClassVar[str]

    def spec(self, *, name: str, tracking: dict[str, Any]) -> BaseModel:
        raise NotImplementedError

    @model_validator(mode="after")
    def _a_valid_spec(self) -> SpecInputs:
        try:
            self.spec(name="a-stage", tracking={})
        except SpecError as error:  # one line per problem, each with its path in the stage's inputs
            raise ValueError("\n".join(f"{self.spec_field}.{problem}" for problem in error.problems)) from None
        return self


class StageOutputs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class StageContext:
    """One execution of one stage of one pipeline run."""

    settings: Settings
    pipeline: str
    experiment: str
    stage: str
    parent: RunRef  # the pipeline run
    attempt: int  # bumped by `--from`: a forced re-run trains anew instead of resuming

    @property
    def key(self) -> str:
        """Six hex digits naming this stage's work in this pipeline run: the same when a failed run is
        resumed (a training job continues from its checkpoints), new for a forced re-run."""
        text = json.dumps([self.parent.run_id, self.stage, self.attempt])
        return hashlib.sha256(text.encode()).hexdigest()[:6]

    @property
    def job_name(self) -> str:
        """The name of the training job or sweep this stage runs (within a sweep name's 50 characters)."""
        return f"{self.pipeline}-{self.stage}-{self.key}"

    @property
    def storage(self) -> str:
        """Where the stage's files go."""
        return (f"s3://{self.settings.checkpoints_bucket}/{PIPELINE_STORAGE_PREFIX}/{self.pipeline}/"
                f"{self.parent.run_id}/{self.stage}-{self.key}")

    def tags(self) -> dict[str, str]:
        """The tags that nest a stage's run under the pipeline run."""
        return {PARENT_TAG: self.parent.run_id, PIPELINE_TAG: self.pipeline, STAGE_TAG: self.stage}

    def tracking(self, section: dict[str, Any] | None) -> dict[str, Any]:
        """A job or sweep spec's tracking section, put into the pipeline's experiment under its run."""
        section = dict(section or {})
        return {**section, "experiment": self.experiment, "run_name": f"{self.stage} ({self.job_name})",
                "tags": {**section.get("tags", {}), **self.tags()}}

    def child_run(self) -> RunRef:
        """A run of its own, under the pipeline run, for a stage that is not a job (quantize, evaluate)."""
        from mlflow import MlflowClient

        client = MlflowClient(self.parent.tracking_uri)
        run = client.create_run(self.parent.experiment_id, run_name=self.stage, tags=self.tags())
        return RunRef(tracking_uri=self.parent.tracking_uri, experiment_id=self.parent.experiment_id,
                      run_id=run.info.run_id, started_s=run.info.start_time / 1000)
