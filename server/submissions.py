"""A submission sent to the server, planned as `compound job|sweep|pipeline submit` plans one: the spec
(YAML text, its files read in by the CLI) checked against its data, the cluster's room and the
submissions active or queued, and stored on S3 where its driver will read it."""

from __future__ import annotations

import os
from collections.abc import Collection

from pydantic import TypeAdapter

from infra.settings import Settings
from jobs.spec import Duration
from jobs.submit import MAX_RUNTIME_KEY, JobsClient, Plan, Queued, plan_job, plan_sweep

DEFAULT_MAX_RUNTIME_ENV = "COMPOUND_SERVER_MAX_RUNTIME"  # e.g. 1d: a submission whose spec names none gets it


def plan_text(kind: str, text: str, settings: Settings, client: JobsClient, *, from_stage: str | None = None,
              queued: Collection[Queued] = ()) -> Plan:
    """`SpecError` for a spec that is wrong, `SubmissionError` for one that cannot run now or ever."""
    from jobs.spec import load_job_spec_text, load_sweep_spec_text

    source = f"the submitted {kind}"
    if kind == "job":
        plan = plan_job(load_job_spec_text(text, source), settings, client, gcs_address=settings.ray_address,
                        source=source, queued=queued)
    elif kind == "sweep":
        plan = plan_sweep(load_sweep_spec_text(text, source), settings, client, source=source, queued=queued)
    else:
        from pipelines.runner import check_data, check_models
        from pipelines.spec import check_from, load_pipeline_spec_text
        from pipelines.submit import plan_pipeline_submission

        spec = load_pipeline_spec_text(text, source)
        check_from(spec, from_stage)
        check_data(spec, settings)
        check_models(spec, settings)
        plan = plan_pipeline_submission(spec, settings, client, options=("--from", from_stage) if from_stage else (),
                                        queued=queued)
    if MAX_RUNTIME_KEY not in plan.metadata and (default := default_max_runtime()) is not None:
        plan.metadata[MAX_RUNTIME_KEY] = f"{default:g}"
    return plan


def default_max_runtime() -> float | None:
    """The server's default max_runtime in seconds (None: none); a wrong value stops the server at start."""
    value = os.environ.get(DEFAULT_MAX_RUNTIME_ENV)
    return TypeAdapter(Duration).validate_python(value) if value else None
