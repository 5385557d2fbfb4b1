"""A pipeline's driver (`compound pipeline run`) as a Ray job: `compound pipeline submit` and the scheduler."""

from __future__ import annotations

from infra.settings import Settings
from jobs.submit import JobsClient, Plan, plan_driver
from pipelines.spec import PipelineSpec
from pipelines.stages.base import PIPELINE_STORAGE_PREFIX


def plan_pipeline_submission(spec: PipelineSpec, settings: Settings, client: JobsClient, *,
                             options: tuple[str, ...] = ()) -> Plan:
    """The pipeline's driver (`compound pipeline run`, with `options`) as a Ray job, unless one is active."""
    return plan_driver(spec, kind="pipeline", name=spec.name, experiment=spec.experiment_name, client=client,
                       folder=f"s3://{settings.checkpoints_bucket}/{PIPELINE_STORAGE_PREFIX}/{spec.name}",
                       options=options)
