"""`compound job run` against the real local stack: what is refused before anything starts, and what a
relaunch checks. The smoke job and the failure drills (DDP and ZeRO-3) are in test_job_submit.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import yaml
from click.testing import CliRunner

from cluster.data.manifest import ShardManifest
from cluster.data.sources import DigitsSource
from cluster.data.writer import write_shards
from cluster.storage import S3Access
from compound.cli import cli
from infra.settings import Settings
from infra.stack import Stack, StackPorts
from jobs.driver import prepare_job
from jobs.resolve import check_relaunch, record_launch
from jobs.spec import load_job_spec
from tests.jobs.helpers import SMALL, make_spec


def test_a_missing_dataset_or_a_changed_relaunch_is_refused_before_anything_starts(
    stack: Stack, settings: Settings, s3: S3Access, digits: ShardManifest, tmp_path: Path,
) -> None:
    missing, spec = make_spec(tmp_path, data={"train": {"manifest": "s3://shards/nowhere/manifest.json"}})
    result = CliRunner().invoke(cli, ["job", "run", str(missing), "--home", str(stack.home)])
    assert result.exit_code == 2, result.output
    assert "data.train.manifest: no dataset at s3://shards/nowhere/manifest.json" in result.output
    assert "compound data shards" in result.output
    assert "Contents" not in s3.client().list_objects_v2(Bucket="checkpoints", Prefix=f"jobs/{spec['name']}/")

    no_ray, spec = make_spec(tmp_path)
    nowhere = {"COMPOUND_RAY_ADDRESS": f"127.0.0.1:{StackPorts.free().ray}"}
    result = CliRunner().invoke(cli, ["job", "run", str(no_ray), "--home", str(stack.home)], env=nowhere)
    # Exit 75: the cluster, not the job, failed it (the compound server submits such a driver again).
    assert result.exit_code == 75 and "cannot reach the Ray cluster at 127.0.0.1:" in result.output, result.output
    assert "Contents" not in s3.client().list_objects_v2(Bucket="checkpoints", Prefix=f"jobs/{spec['name']}/")

    crowded, _ = make_spec(tmp_path, scaling={"num_workers": 1024}, data={"loader_workers": 2})
    result = CliRunner().invoke(cli, ["job", "validate", str(crowded), "--home", str(stack.home)])
    assert result.exit_code == 2 and "fewer than the 2048 readers" in result.output, result.output

    first, spec = make_spec(tmp_path, **SMALL)
    _launched_with_a_checkpoint(first, spec, settings, s3)
    changed = yaml.safe_load(first.read_text())
    changed["data"]["batch_size"] = 8
    changed["tracking"] = {"experiment": "another"}  # may change: it does not change what is trained
    first.write_text(yaml.safe_dump(changed))
    result = CliRunner().invoke(cli, ["job", "run", str(first), "--home", str(stack.home)])
    assert result.exit_code == 2, result.output
    assert f"job '{spec['name']}' was launched before with another spec" in result.output
    assert "changed: data.batch_size." in result.output


def test_the_console_script_runs_a_job_logging_itself_in(stack: Stack, digits: ShardManifest, tmp_path: Path) -> None:
    """As from a person's shell: no Ray token or MLflow login in the environment, only the state dir. The
    command imports Ray before it reads the settings, and Ray takes its auth mode at import: the CLI puts the
    logins in its environment first (in-process tests have them from tests/__init__.py)."""
    spec_path, spec = make_spec(tmp_path, **SMALL)
    logins = ("RAY_AUTH_", "COMPOUND_RAY_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    env = {name: value for name, value in os.environ.items() if not name.startswith(logins)}
    done = subprocess.run([str(Path(sys.executable).with_name("compound")), "job", "run", str(spec_path), "--json",
                           "--home", str(stack.home)], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["job"] == spec["name"] and outcome["checkpoint"] and len(outcome["epochs"]) == 1


def _launch_records(spec_path: Path, settings: Settings, s3: S3Access) -> None:
    """What the driver does before training starts: check the job's storage, then record the launch."""
    job = prepare_job(load_job_spec(spec_path), settings, source=str(spec_path))
    launch = check_relaunch(job, s3=s3, source=str(spec_path))
    assert launch.resumes is False
    record_launch(job, launch, s3=s3, run_id=None)


def _launched_with_a_checkpoint(spec_path: Path, spec: dict, settings: Settings, s3: S3Access) -> None:
    """What a launch that got as far as one checkpoint leaves in storage (the checkpoint itself stands in)."""
    _launch_records(spec_path, settings, s3)
    s3.client().put_object(Bucket="checkpoints", Key=f"jobs/{spec['name']}/epoch0000-step0000010/progress.json",
                           Body=b"{}")


def test_a_job_recorded_before_a_spec_field_existed_resumes(settings: Settings, s3: S3Access, digits: ShardManifest,
                                                            tmp_path: Path) -> None:
    spec_path, spec = make_spec(tmp_path, **SMALL)
    _launched_with_a_checkpoint(spec_path, spec, settings, s3)
    key = f"jobs/{spec['name']}/compound-job.json"
    record = json.loads(s3.client().get_object(Bucket="checkpoints", Key=key)["Body"].read())
    del record["spec"]["model"]["bn_momentum"]  # as an older compound wrote it
    s3.client().put_object(Bucket="checkpoints", Key=key, Body=json.dumps(record).encode())
    job = prepare_job(load_job_spec(spec_path), settings, source=str(spec_path))
    assert check_relaunch(job, s3=s3, source=str(spec_path)).resumes


def test_a_launch_that_left_no_checkpoint_binds_nothing(settings: Settings, s3: S3Access, digits: ShardManifest,
                                                        tmp_path: Path) -> None:
    spec_path, spec = make_spec(tmp_path, **SMALL)
    for batch_size in (16, 8):  # say the first launch failed before its first checkpoint, and the user fixed the spec
        changed = yaml.safe_load(spec_path.read_text())
        changed["data"]["batch_size"] = batch_size
        spec_path.write_text(yaml.safe_dump(changed))
        _launch_records(spec_path, settings, s3)
    record = s3.client().get_object(Bucket="checkpoints", Key=f"jobs/{spec['name']}/compound-job.json")
    assert json.loads(record["Body"].read())["spec"]["data"]["batch_size"] == 8


def test_pretrained_weights_that_do_not_fit_are_refused_before_workers_start(
    stack: Stack, s3: S3Access, digits: ShardManifest, tmp_path: Path,
) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.efficientnet_b1().state_dict(), tmp_path / "b1.pth")
    spec_path, spec = make_spec(tmp_path, model={"pretrained": str(tmp_path / "b1.pth")})
    result = CliRunner().invoke(cli, ["job", "run", str(spec_path), "--home", str(stack.home)])
    assert result.exit_code == 2, result.output
    assert "model.pretrained: weights in" in result.output and "do not fit efficientnet_b0" in result.output
    assert "Contents" not in s3.client().list_objects_v2(Bucket="checkpoints", Prefix=f"jobs/{spec['name']}/")


def test_a_relaunch_on_a_rewritten_dataset_is_refused(stack: Stack, settings: Settings, s3: S3Access,
                                                      tmp_path: Path) -> None:
    dest = f"s3://shards/relaunch-{uuid.uuid4().hex[:6]}/"
    url = write_shards(DigitsSource(image_size=16, val_fraction=0.2, seed=0), dest, s3=s3, shard_bytes=20_000).url
    split = {"train": {"manifest": url, "split": "train"}, "val": {"manifest": url, "split": "val"}}
    spec_path, spec = make_spec(tmp_path, data=split)
    _launched_with_a_checkpoint(spec_path, spec, settings, s3)
    write_shards(DigitsSource(image_size=16, val_fraction=0.2, seed=1), dest, s3=s3, shard_bytes=20_000, overwrite=True)
    result = CliRunner().invoke(cli, ["job", "run", str(spec_path), "--home", str(stack.home)])
    assert result.exit_code == 2, result.output
    assert f"data.train: the dataset at {url} was written again since job '{spec['name']}'" in result.output
