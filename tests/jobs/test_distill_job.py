"""Distillation jobs against the real local stack: every form of teacher a spec may name, what is refused,
and a distillation job (features included) that resumes exactly after a worker kill."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

import effnet
from cluster.data.manifest import ShardManifest
from cluster.storage import S3Access
from cluster.train.checkpoint import WEIGHTS_FILE, Progress, save_progress
from cluster.train.config import ModelSpec
from cluster.train.distill import TEACHER_FILE, pinned_info
from cluster.train.models import build_model
from compound.cli import cli
from effnet.weights import save_checkpoint
from infra.settings import Settings
from infra.stack import Stack
from jobs.model_source import ModelSourceError, resolve_teacher
from jobs.spec import JobSpec
from jobs.tags import MODEL_TAG, TEACHER_TAG
from pipelines.registry import promoter_client
from tests.jobs.helpers import (
    DRILL_CHECKPOINTS,
    SMALL,
    check_lineage,
    check_no_orphans,
    first_new_step,
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

TEACHER_RESOLUTION = 48  # not the student's 32: the loader crops at 48 and the student sees it resized


def _checkpoint(s3: S3Access, tmp_path: Path, *, classes: int) -> str:
    """A finished job's epoch-end checkpoint on S3, as the training loop writes one: a B0 teacher."""
    name = f"teacher-{uuid.uuid4().hex[:6]}"
    folder = tmp_path / name
    folder.mkdir()
    torch.manual_seed(0)
    save_checkpoint(effnet.build("efficientnet_b0", num_classes=classes), folder / WEIGHTS_FILE)
    spec = {"name": name, "model": {"arch": "efficientnet_b0", "num_classes": classes,
                                    "resolution": TEACHER_RESOLUTION}}
    save_progress(folder, Progress(epoch=1), rank=0, spec_json=json.dumps(spec))
    prefix = f"jobs/{name}/{Progress(epoch=1).name}"
    for path in folder.iterdir():
        s3.client().upload_file(str(path), "checkpoints", f"{prefix}/{path.name}")
    return f"s3://checkpoints/{prefix}"


def _registered(settings: Settings, checkpoint: str, *, tagged: bool = True) -> tuple[str, str]:
    """A run whose logged model came from `checkpoint`, registered with the alias champion: (run id, model name)."""
    client = MlflowClient(settings.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name("teachers") or client.get_experiment(
        client.create_experiment("teachers"))
    run = client.create_run(experiment.experiment_id, tags={MODEL_TAG: checkpoint} if tagged else {})
    client.set_terminated(run.info.run_id)
    name = f"teacher-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    promoter_client(settings).set_registered_model_alias(name, "champion", version.version)
    return run.info.run_id, name


def _student(teacher: str, **distill) -> JobSpec:
    return JobSpec(name="student", model={"arch": "efficientnet_b0", "num_classes": 10, "resolution": 32},
                   data={"train": {"manifest": "s3://shards/digits/manifest.json", "split": "train"},
                         "val": {"manifest": "s3://shards/digits/manifest.json", "split": "val"}},
                   checkpoint={"storage": "s3://checkpoints/jobs"}, distill={"teacher": teacher, **distill})


def test_every_form_of_teacher_resolves_to_the_same_model(settings: Settings, s3: S3Access, tmp_path: Path) -> None:
    checkpoint = _checkpoint(s3, tmp_path, classes=10)
    run_id, model_name = _registered(settings, checkpoint)
    local = tmp_path / "local.safetensors"
    s3.client().download_file("checkpoints", checkpoint.removeprefix("s3://checkpoints/") + f"/{WEIGHTS_FILE}",
                              str(local))
    sources = [checkpoint, f"models:/{model_name}@champion", f"models:/{model_name}/1", f"runs:/{run_id}/model"]
    for source in sources:
        distill = resolve_teacher(_student(source), s3=s3, tracking_uri=settings.mlflow_tracking_uri)
        assert (distill.teacher_arch, distill.teacher_resolution) == ("efficientnet_b0", TEACHER_RESOLUTION), source
    # A file alone does not know the resolution it was trained at: the model's, unless the spec says.
    for source in (str(local), f"{checkpoint}/{WEIGHTS_FILE}"):
        distill = resolve_teacher(_student(source, teacher_resolution=40), s3=s3,
                                  tracking_uri=settings.mlflow_tracking_uri)
        assert (distill.teacher_arch, distill.teacher_resolution) == ("efficientnet_b0", 40)


def test_a_teacher_that_cannot_teach_is_refused_clearly(stack: Stack, settings: Settings, s3: S3Access,
                                                        tmp_path: Path, digits: ShardManifest) -> None:
    five_classes = _checkpoint(s3, tmp_path, classes=5)
    _, untagged = _registered(settings, five_classes, tagged=False)
    plain = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(10, 3)}, plain)
    refused = {
        five_classes: "predicts 5 classes, the student 10",
        "s3://checkpoints/jobs/nobody/epoch0001-step0000000": "no such object",
        f"models:/{untagged}@champion": "not logged by a compound job",
        "models:/no-such-model@champion": "MLflow at",
        str(plain): "name it with distill.teacher_arch",
        str(tmp_path / "missing.pt"): "no such file here",
        "https://example.com/w.pt": "give an s3:// checkpoint",
    }
    for source, message in refused.items():
        with pytest.raises(ModelSourceError, match=message):
            resolve_teacher(_student(source), s3=s3, tracking_uri=settings.mlflow_tracking_uri)
    with pytest.raises(ModelSourceError, match="size mismatch for fc.weight"):
        resolve_teacher(_student(str(plain), teacher_arch="resnet50"), s3=s3, tracking_uri=settings.mlflow_tracking_uri)
    mobilenet = tmp_path / "mobilenet.pt"
    torch.save(build_model(ModelSpec(arch="mobilenet_v3_large", num_classes=10)).state_dict(), mobilenet)
    with pytest.raises(ModelSourceError, match="does not hold resnet50 weights: 267 missing keys"):
        resolve_teacher(_student(str(mobilenet), teacher_arch="resnet50"), s3=s3, tracking_uri=settings.mlflow_tracking_uri)
    with pytest.raises(ModelSourceError, match="features needs an EfficientNet teacher"):
        resolve_teacher(_student(str(mobilenet), teacher_arch="mobilenet_v3_large", features={}), s3=s3,
                        tracking_uri=settings.mlflow_tracking_uri)

    spec_path, spec = make_spec(tmp_path, **SMALL, distill={"teacher": five_classes})
    result = CliRunner().invoke(cli, ["job", "validate", str(spec_path), "--home", str(stack.home)])
    assert result.exit_code == 2, result.output
    assert "distill.teacher: the teacher predicts 5 classes" in result.output
    listing = s3.client().list_objects_v2(Bucket="checkpoints", Prefix=f"jobs/{spec['name']}/")
    assert listing.get("KeyCount", 0) == 0  # nothing pinned, nothing recorded


def test_a_submitted_deepspeed_distillation_job_resumes_exactly_after_a_worker_kill(
    stack: Stack, settings: Settings, s3: S3Access, digits: ShardManifest, tmp_path: Path,
) -> None:
    # A teacher file on the submitting machine: pinned at submission, so the cluster never needs the file.
    teacher = tmp_path / "teacher.safetensors"
    checkpoint = _checkpoint(s3, tmp_path, classes=10)
    s3.client().download_file("checkpoints", checkpoint.removeprefix("s3://checkpoints/") + f"/{WEIGHTS_FILE}",
                              str(teacher))
    spec_path, spec = make_spec(tmp_path, **SMALL, checkpoint=DRILL_CHECKPOINTS,
                                strategy={"name": "deepspeed", "zero_stage": 2}, precision={"dtype": "bf16"},
                                distill={"teacher": str(teacher), "teacher_resolution": TEACHER_RESOLUTION,
                                         "alpha": 0.5, "temperature": 4.0,
                                         "features": {"stages": [3, 4], "weight": 0.5}})
    every = spec["checkpoint"]["every_steps"]
    job = submit(spec_path, stack, settings)
    teacher.unlink()
    wait_for(uploaded(s3, spec, epoch=0, step=every), "a checkpoint in epoch 0", job)
    seen = latest_uploaded(s3, spec)
    wait_for(reached(tmp_path, epoch=seen[0], step=seen[1] + 3), "a few steps after it", job)
    old_pids = kill_rank(tmp_path, rank=0)
    assert job.wait() == "SUCCEEDED", job.logs()[-6000:]

    log = sample_log(tmp_path)
    redone = check_lineage(log, split_keys(digits, s3), epochs=1)
    assert first_new_step(log, old_pids, rank=0) > seen
    assert max(redone.values()) <= every, f"steps redone per rank: {redone}"
    check_no_orphans(s3, spec)
    prefix = f"jobs/{spec['name']}/"
    files = {o["Key"].rsplit("/", 1)[1] for o in s3.client().list_objects_v2(Bucket="checkpoints", Prefix=prefix)["Contents"]}
    assert len({f for f in files if "zero_pp_rank" in f}) >= 2, files  # ZeRO: every rank saved its own shard

    pinned = tmp_path / TEACHER_FILE
    s3.client().download_file("checkpoints", f"jobs/{spec['name']}/{TEACHER_FILE}", str(pinned))
    assert pinned_info(pinned).source == str(teacher) and pinned_info(pinned).resolution == TEACHER_RESOLUTION
    client = MlflowClient(settings.mlflow_tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                                filter_string=f"tags.`compound.job` = '{spec['name']}'")
    assert run.data.tags[TEACHER_TAG] == str(teacher)
    assert run.data.params["distill.features.stages"] == "[3, 4]"
    assert 0 <= run.data.metrics["train_teacher_top1"] <= 1  # tallied across the restart, like the loss
    weights = tmp_path / WEIGHTS_FILE  # the student's weights alone: no adapters
    s3.client().download_file("checkpoints", run.data.tags[MODEL_TAG].removeprefix("s3://checkpoints/")
                              + f"/{WEIGHTS_FILE}", str(weights))
    effnet.weights.load_checkpoint(weights)
