"""A Ray Train job on a GPU, end to end: bf16 autocast, channels_last, checkpoints, a worker killed and resumed.

Skipped without a CUDA device (`gpu`). The local stack's Ray head finds the machine's GPUs itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from cluster.data.manifest import ShardManifest
from cluster.storage import S3Access
from infra.settings import Settings
from infra.stack import Stack
from tests.jobs.helpers import (
    DRILL_CHECKPOINTS,
    check_lineage,
    first_new_step,
    job_runs,
    kill_rank,
    latest_uploaded,
    make_spec,
    reached,
    sample_log,
    split_keys,
    submit,
    uploaded,
    wait_for,
)

pytestmark = pytest.mark.gpu


def test_a_gpu_job_trains_in_bf16_and_resumes_after_a_worker_kill(
    stack: Stack, settings: Settings, s3: S3Access, digits: ShardManifest, tmp_path: Path,
) -> None:
    spec_path, spec = make_spec(tmp_path, model={"resolution": 32}, optim={"epochs": 2}, checkpoint=DRILL_CHECKPOINTS,
                                precision={"dtype": "bf16", "channels_last": True},
                                scaling={"num_workers": 1, "use_gpu": True, "gpus_per_worker": 1})
    every = spec["checkpoint"]["every_steps"]
    job = submit(spec_path, stack, settings)
    wait_for(uploaded(s3, spec, epoch=0, step=every), "a checkpoint in epoch 0", job)
    seen = latest_uploaded(s3, spec)
    wait_for(reached(tmp_path, epoch=seen[0], step=seen[1] + 3), "a few steps after it", job)
    killed = kill_rank(tmp_path, rank=0)
    assert job.wait() == "SUCCEEDED", job.logs()[-6000:]

    log = sample_log(tmp_path)
    assert first_new_step(log, killed, rank=0) > seen  # resumed from the checkpoint, not from the start
    check_lineage(log, split_keys(digits, s3), epochs=2)
    client = MlflowClient(settings.mlflow_tracking_uri)
    (run,) = job_runs(client, spec["name"])
    top1 = sorted(client.get_metric_history(run.info.run_id, "val_top1"), key=lambda m: m.step)
    assert top1[-1].value > 0.85, top1  # it learned the digits (the CPU run of this recipe: about 0.95)
