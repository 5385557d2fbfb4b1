"""MLflow tracking of training runs. The `tracking` section of a job spec lives here."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# MLflow's limits on names, tag keys and tag values.
MAX_NAME_LENGTH = 250
MAX_TAG_VALUE_LENGTH = 5000


class TrackingSpec(BaseModel):
    """Where a job's MLflow run goes and how it is labelled."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    experiment: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_LENGTH,
                                   description="MLflow experiment; default: the job name")
    run_name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_LENGTH,
                                 description="default: the job name")
    tags: dict[str, str] = Field(default_factory=dict, description="extra MLflow tags on the run")
