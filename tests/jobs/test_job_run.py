"""`compound job run` against the real local stack: Ray Train workers, the S3 store, failures on purpose.

Every run writes a sample log (`data.sample_log`): each rank appends the keys it trained on at every
step. A restarted run repeats the steps after its checkpoint, so the log holds some steps twice; the
last occurrence of each (epoch, step, rank) is the run's lineage, and that must hold every sample of
the split exactly once per epoch.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cluster.data.loader import read_shard
from cluster.data.manifest import ShardManifest
from cluster.data.sources import DigitsSource
from cluster.data.writer import write_shards
from cluster.storage import S3Access
from infra.settings import Settings
from infra.stack import Stack, StackPorts
from jobs.cli import cli
from jobs.driver import prepare_job
from jobs.resolve import check_relaunch
from jobs.spec import load_job_spec

SMOKE = Path(__file__).parents[2] / "jobs" / "examples" / "b0-cpu-smoke.yaml"
COMPOUND = str(Path(sys.executable).with_name("compound"))
RUN_TIMEOUT_S = 420
# Ray Train's record of the checkpoints it registered (read only to time a kill after a registration).
RAY_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"


@pytest.fixture(scope="module")
def digits(s3: S3Access) -> ShardManifest:
    """The demo dataset where the smoke spec expects it: 64 px digits in 0.25 MB shards."""
    source = DigitsSource(image_size=64, val_fraction=0.2, seed=0)
    return write_shards(source, "s3://shards/digits/", s3=s3, shard_bytes=int(0.25 * 2**20), overwrite=True).manifest


def _spec(tmp_path: Path, **changes: dict) -> tuple[Path, dict]:
    """The smoke spec under a fresh name with a sample log, sections updated by `changes`."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = f"{spec['name']}-{uuid.uuid4().hex[:6]}"
    spec["data"]["sample_log"] = str(tmp_path / "samples")
    for section, values in changes.items():
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, spec


def _launch(spec_path: Path, stack: Stack) -> subprocess.Popen:
    return subprocess.Popen([COMPOUND, "job", "run", str(spec_path), "--json", "--home", str(stack.home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=RUN_TIMEOUT_S)
    assert process.returncode == 0, err[-6000:]
    return json.loads([line for line in out.splitlines() if line.startswith('{"job"')][-1])


def _log(tmp_path: Path) -> list[dict]:
    lines = []
    for path in sorted((tmp_path / "samples").glob("rank-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return lines


def _wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{process.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _reached(tmp_path: Path, *, epoch: int, step: int) -> Callable[[], bool]:
    return lambda: any(r["epoch"] == epoch and r["step"] >= step for r in _log(tmp_path))


def _registered(s3: S3Access, spec: dict, checkpoint: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            body = s3.client().get_object(Bucket="checkpoints", Key=f"jobs/{spec['name']}/{RAY_CHECKPOINT_RECORD}")
        except s3.client().exceptions.NoSuchKey:
            return False
        return checkpoint in body["Body"].read().decode()
    return check


def _split_keys(manifest: ShardManifest, s3: S3Access) -> collections.Counter:
    return collections.Counter(s["__key__"] for shard in manifest.split("train").shards
                               for s in read_shard(shard, access=s3))


def _check_lineage(log: list[dict], expected: collections.Counter, epochs: int) -> dict[int, int]:
    """Every epoch's lineage trains each sample once; returns the steps each rank ran more than once."""
    lineage: dict[tuple[int, int, int], list[str]] = {}
    runs = collections.Counter()
    for record in log:
        place = (record["epoch"], record["step"], record["rank"])
        runs[place] += 1
        lineage[place] = record["keys"]  # the last run of a step is the one the model kept
    for epoch in range(epochs):
        trained = collections.Counter(k for (e, _, _), keys in lineage.items() if e == epoch for k in keys)
        assert trained == expected, (f"epoch {epoch}: lost {sorted(expected - trained)[:5]}, "
                                     f"twice {sorted(k for k, n in trained.items() if n > 1)[:5]}")
    redone = collections.Counter()
    for (_, _, rank), count in runs.items():
        redone[rank] += count - 1
    return dict(redone)


def _kill_rank(tmp_path: Path, rank: int) -> int:
    pid = [r["pid"] for r in _log(tmp_path) if r["rank"] == rank][-1]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_smoke_job_learns_and_survives_a_killed_worker_exactly(stack: Stack, s3: S3Access, digits: ShardManifest,
                                                               tmp_path: Path) -> None:
    spec_path, spec = _spec(tmp_path)
    every = spec["checkpoint"]["every_steps"]
    process = _launch(spec_path, stack)
    _wait_for(_registered(s3, spec, f"epoch0001-step{every:07d}"), "a mid-epoch checkpoint of epoch 1", process)
    _wait_for(_reached(tmp_path, epoch=1, step=every + 3), "a few steps after it", process)
    killed = _kill_rank(tmp_path, rank=1)
    outcome = _finish(process)

    history = outcome["epochs"]
    assert [e["epoch"] for e in history] == [0, 1, 2]
    assert all(e["train_samples_epoch"] == digits.split("train").samples for e in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_top1"] > 0.3, history  # 10 classes: chance is 0.1
    log = _log(tmp_path)
    assert killed in {r["pid"] for r in log} and len({r["pid"] for r in log if r["rank"] == 1}) > 1  # restarted
    redone = _check_lineage(log, _split_keys(digits, s3), epochs=3)
    assert 0 < max(redone.values()) <= every, redone
    assert outcome["checkpoint"].startswith(f"s3://checkpoints/jobs/{spec['name']}/epoch0003-step0000000")


SMALL = {"model": {"resolution": 32}, "optim": {"epochs": 1}}  # the smoke job, quicker: for failure drills


@pytest.mark.parametrize(("zero_stage", "dtype"), [(2, "bf16"), (3, "fp32")])
def test_deepspeed_trains_checkpoints_and_resumes_after_a_worker_kill(
    stack: Stack, s3: S3Access, digits: ShardManifest, tmp_path: Path, zero_stage: int, dtype: str,
) -> None:
    spec_path, spec = _spec(tmp_path, **SMALL, strategy={"name": "deepspeed", "zero_stage": zero_stage},
                            precision={"dtype": dtype})
    every = spec["checkpoint"]["every_steps"]
    process = _launch(spec_path, stack)
    _wait_for(_registered(s3, spec, f"epoch0000-step{2 * every:07d}"), "a checkpoint in epoch 0", process)
    _wait_for(_reached(tmp_path, epoch=0, step=2 * every + 3), "a few steps after it", process)
    _kill_rank(tmp_path, rank=0)
    outcome = _finish(process)

    assert [e["train_samples_epoch"] for e in outcome["epochs"]] == [digits.split("train").samples]
    redone = _check_lineage(_log(tmp_path), _split_keys(digits, s3), epochs=1)
    assert 0 < max(redone.values()) <= every, redone
    listing = s3.client().list_objects_v2(Bucket="checkpoints", Prefix=outcome["checkpoint"].split("checkpoints/")[1])
    files = {o["Key"].rsplit("/", 1)[1] for o in listing["Contents"]}
    shards = {f for f in files if "zero_pp_rank" in f}  # ZeRO: every rank saved its own shard
    assert {"progress.json", "model.safetensors", "rank-0.pt", "rank-1.pt"} <= files and len(shards) >= 2, files


def test_relaunching_after_the_driver_died_resumes_from_the_latest_checkpoint(
    stack: Stack, s3: S3Access, digits: ShardManifest, tmp_path: Path,
) -> None:
    spec_path, spec = _spec(tmp_path, **SMALL)
    every = spec["checkpoint"]["every_steps"]
    first = _launch(spec_path, stack)
    _wait_for(_registered(s3, spec, f"epoch0000-step{2 * every:07d}"), "a checkpoint in epoch 0", first)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and nothing else of ours: Ray ends the run it owned
    first.wait()
    old_pids = {r["pid"] for r in _log(tmp_path)}

    outcome = _finish(_launch(spec_path, stack))
    assert outcome["resumed"] is True
    log = _log(tmp_path)
    first_new = next(r for r in log if r["rank"] == 0 and r["pid"] not in old_pids)
    assert (first_new["epoch"], first_new["step"]) > (0, 2 * every), f"restarted at {first_new}, not after the checkpoint"
    assert [e["train_samples_epoch"] for e in outcome["epochs"]] == [digits.split("train").samples]
    _check_lineage(log, _split_keys(digits, s3), epochs=1)


def test_training_rides_out_a_30_second_store_outage(stack: Stack, s3: S3Access, digits: ShardManifest,
                                                     tmp_path: Path) -> None:
    spec_path, _ = _spec(tmp_path, **SMALL)
    process = _launch(spec_path, stack)
    _wait_for(_reached(tmp_path, epoch=0, step=5), "training to start", process)
    try:
        stack.stop_service("s3")
        time.sleep(30)
        assert process.poll() is None, "the job ended during the outage"
    finally:
        stack.up()
    outcome = _finish(process)
    assert [e["train_samples_epoch"] for e in outcome["epochs"]] == [digits.split("train").samples]
    redone = _check_lineage(_log(tmp_path), _split_keys(digits, s3), epochs=1)
    assert max(redone.values(), default=0) == 0, f"the outage restarted workers: {redone}"


def test_a_missing_dataset_or_a_changed_relaunch_is_refused_before_anything_starts(
    stack: Stack, settings: Settings, s3: S3Access, digits: ShardManifest, tmp_path: Path,
) -> None:
    missing, spec = _spec(tmp_path, data={"train": {"manifest": "s3://shards/nowhere/manifest.json"}})
    result = CliRunner().invoke(cli, ["job", "run", str(missing), "--home", str(stack.home)])
    assert result.exit_code == 2, result.output
    assert "data.train.manifest: no dataset at s3://shards/nowhere/manifest.json" in result.output
    assert "compound data shards" in result.output
    assert "Contents" not in s3.client().list_objects_v2(Bucket="checkpoints", Prefix=f"jobs/{spec['name']}/")

    no_ray, spec = _spec(tmp_path)
    nowhere = {"COMPOUND_RAY_ADDRESS": f"127.0.0.1:{StackPorts.free().ray}"}
    result = CliRunner().invoke(cli, ["job", "run", str(no_ray), "--home", str(stack.home)], env=nowhere)
    assert result.exit_code == 1 and "cannot reach the Ray cluster at 127.0.0.1:" in result.output, result.output
    assert "Contents" not in s3.client().list_objects_v2(Bucket="checkpoints", Prefix=f"jobs/{spec['name']}/")

    crowded, _ = _spec(tmp_path, scaling={"num_workers": 16}, data={"loader_workers": 2})
    result = CliRunner().invoke(cli, ["job", "validate", str(crowded), "--home", str(stack.home)])
    assert result.exit_code == 2 and "fewer than the 32 readers" in result.output, result.output

    first, spec = _spec(tmp_path, **SMALL)
    _launched_with_a_checkpoint(first, spec, settings, s3)
    changed = yaml.safe_load(first.read_text())
    changed["data"]["batch_size"] = 8
    changed["tracking"] = {"experiment": "another"}  # may change: it does not change what is trained
    first.write_text(yaml.safe_dump(changed))
    result = CliRunner().invoke(cli, ["job", "run", str(first), "--home", str(stack.home)])
    assert result.exit_code == 2, result.output
    assert f"job '{spec['name']}' was launched before with another spec" in result.output
    assert "changed: data.batch_size." in result.output


def _launched_with_a_checkpoint(spec_path: Path, spec: dict, settings: Settings, s3: S3Access) -> None:
    """What a launch that got as far as one checkpoint leaves in storage (the checkpoint itself stands in)."""
    assert check_relaunch(prepare_job(load_job_spec(spec_path), settings, source="first"), s3=s3, source="first") is False
    s3.client().put_object(Bucket="checkpoints", Key=f"jobs/{spec['name']}/epoch0000-step0000010/progress.json",
                           Body=b"{}")


def test_a_launch_that_left_no_checkpoint_binds_nothing(settings: Settings, s3: S3Access, digits: ShardManifest,
                                                        tmp_path: Path) -> None:
    spec_path, spec = _spec(tmp_path, **SMALL)
    for batch_size in (16, 8):  # say the first launch failed before its first checkpoint, and the user fixed the spec
        changed = yaml.safe_load(spec_path.read_text())
        changed["data"]["batch_size"] = batch_size
        spec_path.write_text(yaml.safe_dump(changed))
        resolved = prepare_job(load_job_spec(spec_path), settings, source=str(spec_path))
        assert check_relaunch(resolved, s3=s3, source=str(spec_path)) is False
    record = s3.client().get_object(Bucket="checkpoints", Key=f"jobs/{spec['name']}/compound-job.json")
    assert json.loads(record["Body"].read())["spec"]["data"]["batch_size"] == 8


def test_pretrained_weights_that_do_not_fit_are_refused_before_workers_start(
    stack: Stack, s3: S3Access, digits: ShardManifest, tmp_path: Path,
) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.efficientnet_b1().state_dict(), tmp_path / "b1.pth")
    spec_path, spec = _spec(tmp_path, model={"pretrained": str(tmp_path / "b1.pth")})
    result = CliRunner().invoke(cli, ["job", "run", str(spec_path), "--home", str(stack.home)])
    assert result.exit_code == 2, result.output
    assert "model.pretrained: weights in" in result.output and "do not fit efficientnet_b0" in result.output
    assert "Contents" not in s3.client().list_objects_v2(Bucket="checkpoints", Prefix=f"jobs/{spec['name']}/")


def test_a_relaunch_on_a_rewritten_dataset_is_refused(stack: Stack, settings: Settings, s3: S3Access,
                                                      tmp_path: Path) -> None:
    dest = f"s3://shards/relaunch-{uuid.uuid4().hex[:6]}/"
    url = write_shards(DigitsSource(image_size=16, val_fraction=0.2, seed=0), dest, s3=s3, shard_bytes=20_000).url
    split = {"train": {"manifest": url, "split": "train"}, "val": {"manifest": url, "split": "val"}}
    spec_path, spec = _spec(tmp_path, data=split)
    _launched_with_a_checkpoint(spec_path, spec, settings, s3)
    write_shards(DigitsSource(image_size=16, val_fraction=0.2, seed=1), dest, s3=s3, shard_bytes=20_000, overwrite=True)
    result = CliRunner().invoke(cli, ["job", "run", str(spec_path), "--home", str(stack.home)])
    assert result.exit_code == 2, result.output
    assert f"data.train: the dataset at {url} was written again since job '{spec['name']}'" in result.output
