"""The job's MLflow run against the real local stack, where the driver's process may be shared."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient

import effnet
from cluster.storage import S3Access
from cluster.tracking import RunRef
from cluster.train.checkpoint import PROGRESS_FILE, WEIGHTS_FILE, Progress, save_progress
from effnet.weights import save_checkpoint
from infra.settings import Settings
from jobs.spec import JobSpec
from jobs.tags import MODEL_TAG
from jobs.tracking import log_final_model
from tests.effnet.helpers import as_if_trained


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
    spec = JobSpec(name=name, model={"arch": "efficientnet_b0", "num_classes": 10, "resolution": 32},
                   data={"train": {"manifest": "s3://shards/digits/manifest.json", "split": "train"}},
                   checkpoint={"storage": "s3://checkpoints/jobs"})
    # An epoch-end checkpoint as the training loop writes one: the weights, and the progress with the spec.
    trained = as_if_trained(effnet.build("efficientnet_b0", num_classes=10)).eval()
    save_checkpoint(trained, tmp_path / WEIGHTS_FILE)
    save_progress(tmp_path, Progress(epoch=1), rank=0, spec_json=spec.model_dump_json())
    for file in (WEIGHTS_FILE, PROGRESS_FILE):
        s3.client().upload_file(str(tmp_path / file), "checkpoints", f"{checkpoint.removeprefix('s3://checkpoints/')}/{file}")

    log_final_model(RunRef(settings.mlflow_tracking_uri, experiment_id, run.info.run_id, time.time()), spec,
                    checkpoint=checkpoint, history=[], s3=s3)

    assert client.get_run(run.info.run_id).data.tags[MODEL_TAG] == checkpoint
    (model,) = mlflow.search_logged_models(experiment_ids=[experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    assert model.name == "model"
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(logged(images), trained(images))  # the checkpoint's weights, as trained
