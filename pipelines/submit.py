"""A pipeline's driver (`compound pipeline run`) as a Ray job: `compound pipeline submit` and the scheduler."""

from __future__ import annotations

import math
from collections.abc import Collection

from pydantic import ValidationError

from cluster.train.config import ScalingSpec
from infra.settings import Settings
from jobs.capacity import scaled
from jobs.submit import JobsClient, Plan, Queued, plan_driver
from pipelines.spec import PipelineSpec
from pipelines.stages.base import PIPELINE_STORAGE_PREFIX


def plan_pipeline_submission(spec: PipelineSpec, settings: Settings, client: JobsClient, *,
                             options: tuple[str, ...] = (), queued: Collection[Queued] = ()) -> Plan:
    """The pipeline's driver (`compound pipeline run`, with `options`) as a Ray job, unless one is active."""
    return plan_driver(spec, kind="pipeline", name=spec.name, experiment=spec.experiment_name, client=client,
                       folder=f"s3://{settings.checkpoints_bucket}/{PIPELINE_STORAGE_PREFIX}/{spec.name}",
                       options=options, needs=pipeline_needs(spec, client.capacity()), queued=queued)


def pipeline_needs(spec: PipelineSpec, nodes: list[dict[str, float]]) -> dict[str, float]:
    """The most any one stage holds at once (the stages run one after another): its job's workers, or a
    sweep's trials at once; `nodes` bound a sweep that runs as many trials as fit."""
    most: dict[str, float] = {}
    for stage in spec.stages.values():
        for name, amount in _stage_needs(stage.with_, nodes).items():
            most[name] = max(most.get(name, 0.0), amount)
    return most


def _stage_needs(inputs: dict, nodes: list[dict[str, float]]) -> dict[str, float]:
    sweep = inputs.get("sweep")
    job = sweep.get("job") if isinstance(sweep, dict) else inputs.get("job")
    if not isinstance(job, dict):
        return {}  # quantize, evaluate, register, promote: the driver's own work
    try:
        scaling = ScalingSpec.model_validate(job.get("scaling") or {})
    except ValidationError:
        return {}  # the stage itself names the problem when it runs
    one = scaled(scaling.worker_resources, scaling.min_workers)
    if not isinstance(sweep, dict):
        return one
    room = min((math.floor(sum(n.get(k, 0.0) for n in nodes) / v) for k, v in one.items() if v > 0), default=1)
    at_once = min(sweep.get("max_concurrent_trials") or room, sweep.get("trials") or 1)
    return scaled(one, max(1, at_once))
