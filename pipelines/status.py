"""What `compound pipeline status` shows: a pipeline's latest runs, read from MLflow (the runs are the record)."""

from __future__ import annotations

from cluster.tracking import RunRef
from jobs.tags import SUBMISSION_TAG
from pipelines.runner import DATA_TAG, ORDER_TAG, quoted, stage_records
from pipelines.stages.base import PIPELINE_TAG


def pipeline_runs(tracking_uri: str, name: str | None, *, limit: int) -> list[dict]:
    """The latest `limit` runs of pipeline `name` (of each pipeline when None), newest first."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not experiments:
        return []
    query = f"tags.`{DATA_TAG}` LIKE 's3://%'"
    if name is not None:
        query += f" and tags.`{PIPELINE_TAG}` = '{quoted(name)}'"
    runs = client.search_runs(experiments, filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=500)
    shown: list[dict] = []
    per_pipeline: dict[str, int] = {}
    for run in runs:
        pipeline = run.data.tags[PIPELINE_TAG]
        per_pipeline[pipeline] = per_pipeline.get(pipeline, 0) + 1
        if per_pipeline[pipeline] > limit:
            continue
        records = stage_records(run.data.tags)
        order = [stage for stage in run.data.tags.get(ORDER_TAG, "").split(",") if stage] or list(records)
        shown.append({
            "pipeline": pipeline, "run_id": run.info.run_id, "status": run.info.status,
            "start_s": run.info.start_time / 1000, "data": run.data.tags[DATA_TAG],
            "submission_id": run.data.tags.get(SUBMISSION_TAG),
            "url": RunRef(tracking_uri, run.info.experiment_id, run.info.run_id, run.info.start_time / 1000).url,
            "stages": {stage: records[stage].__dict__ if stage in records else {"status": "pending"}
                       for stage in order},
        })
    return shown
