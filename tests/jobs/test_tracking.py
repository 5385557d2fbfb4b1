"""The job's MLflow run against the real local stack, where the driver's process may be shared."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import mlflow
from mlflow import MlflowClient

import effnet
from cluster.storage import S3Access
from cluster.tracking import RunRef
from cluster.train.checkpoint import WEIGHTS_FILE, Progress
from effnet.weights import save_checkpoint
from infra.settings import Settings
from jobs.spec import JobSpec
from jobs.tags import MODEL_TAG
from jobs.tracking import log_final_model


def test_the_final_model_is_logged_whatever_experiment_the_process_has_set(
    settings: Settings, s3: S3Access, tmp_path: Path,
) -> None:
    # A pipeline, a notebook or a test in the same process may have made another experiment the active one.
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment(f"elsewhere-{uuid.uuid4().hex[:6]}")
    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment_id = client.create_experiment(f"job-{uuid.uuid4().hex[:6]}")
    run = client.create_run(experiment_id)
    name = f"final-{uuid.uuid4().hex[:6]}"
    checkpoint = f"s3://checkpoints/jobs/{name}/{Progress(epoch=1).name}"
    weights = save_checkpoint(effnet.build("efficientnet_b0", num_classes=10), tmp_path / WEIGHTS_FILE)
    s3.client().upload_file(str(weights), "checkpoints", f"{checkpoint.removeprefix('s3://checkpoints/')}/{WEIGHTS_FILE}")
    spec = JobSpec(name=name, model={"arch": "efficientnet_b0", "num_classes": 10, "resolution": 32},
                   data={"train": {"manifest": "s3://shards/digits/manifest.json", "split": "train"}},
                   checkpoint={"storage": "s3://checkpoints/jobs"})

    log_final_model(RunRef(settings.mlflow_tracking_uri, experiment_id, run.info.run_id, time.time()), spec,
                    checkpoint=checkpoint, history=[], s3=s3)

    assert client.get_run(run.info.run_id).data.tags[MODEL_TAG] == checkpoint
    (model,) = mlflow.search_logged_models(experiment_ids=[experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    assert model.name == "model"
