"""What the job tests share: specs under fresh names, the sample log, waiting, and the lineage check.

Every run writes a sample log (`data.sample_log`): each rank appends the keys it trained on at every
step. A restarted run repeats the steps after its checkpoint, so the log holds some steps twice; the
last occurrence of each (epoch, step, rank) is the run's lineage, and that must hold every sample of
the split exactly once per epoch.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
import signal
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
from cluster.storage import S3Access
from cluster.train.checkpoint import newest_uploaded
from compound.cli import cli
from infra.settings import Settings
from infra.stack import Stack
from jobs.tags import JOB_TAG

SMOKE = Path(__file__).parents[2] / "jobs" / "examples" / "b0-cpu-smoke.yaml"
COMPOUND = str(Path(sys.executable).with_name("compound"))
RUN_TIMEOUT_S = 420
JOB_TIMEOUT_S = 480  # a submission's
# Ray Train's record of the checkpoints it registered.
RAY_CHECKPOINT_RECORD = "checkpoint_manager_snapshot.json"
SMALL = {"model": {"resolution": 32}, "optim": {"epochs": 1}}  # the smoke job, quicker: for failure drills
# Checkpoints upload in the background, so a worker killed while one is on its way resumes from the one
# before: steps redone stay within one interval when an interval outlasts an upload. Here an upload takes
# a few seconds on two busy cores, up to 15 of the tiny steps at 32 px.
DRILL_CHECKPOINTS = {"every_steps": 20}


def make_spec(tmp_path: Path, **changes: dict) -> tuple[Path, dict]:
    """The smoke spec under a fresh name with a sample log, sections updated by `changes`."""
    spec = yaml.safe_load(SMOKE.read_text())
    spec["name"] = f"{spec['name']}-{uuid.uuid4().hex[:6]}"
    spec["data"]["sample_log"] = str(tmp_path / "samples")
    for section, values in changes.items():
        spec[section] = {**spec.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, spec


def sample_log(tmp_path: Path) -> list[dict]:
    lines = []
    for path in sorted((tmp_path / "samples").glob("rank-*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return lines


# Every condition waited for only grows true (a log, the sample log, what is uploaded), and a look at a job's log
# reads it whole through Ray's dashboard: 5 a second cost a drill's stack a tenth of a core (360 KB of log).
WAIT_POLL_S = 0.5


def wait_for(condition: Callable[[], bool], what: str, process, timeout_s: float = 300) -> None:
    """Wait for `condition` while `process` (a Popen, or anything with its `poll()` and `stderr`) runs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended before {what}:\n{process.stderr.read()[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(WAIT_POLL_S)


def reached(tmp_path: Path, *, epoch: int, step: int) -> Callable[[], bool]:
    return lambda: any(r["epoch"] == epoch and r["step"] >= step for r in sample_log(tmp_path))


def _point(name: str) -> tuple[int, int]:
    epoch, step = re.fullmatch(r"epoch(\d{4})-step(\d{7})", name).groups()
    return int(epoch), int(step)


def experiment_path(spec: dict) -> str:
    return f"checkpoints/jobs/{spec['name']}"


def latest_uploaded(s3: S3Access, spec: dict) -> tuple[int, int]:
    """(epoch, step) of the newest checkpoint every rank has uploaded (what a restart resumes from)."""
    path = newest_uploaded(s3.filesystem(), experiment_path(spec))
    return _point(path.rsplit("/", 1)[1]) if path else (-1, -1)


def uploaded(s3: S3Access, spec: dict, *, epoch: int, step: int) -> Callable[[], bool]:
    """Whether a checkpoint at (epoch, step) or later is uploaded (older ones may be pruned already)."""
    return lambda: latest_uploaded(s3, spec) >= (epoch, step)


def check_no_orphans(s3: S3Access, spec: dict) -> None:
    """The job's storage holds only the checkpoints Ray Train registered: none a failure cut short."""
    record = s3.client().get_object(Bucket="checkpoints", Key=f"jobs/{spec['name']}/{RAY_CHECKPOINT_RECORD}")
    registered = set(re.findall(r"epoch\d{4}-step\d{7}", record["Body"].read().decode()))
    listing = s3.client().get_paginator("list_objects_v2").paginate(Bucket="checkpoints", Prefix=f"jobs/{spec['name']}/")
    stored = {m for page in listing for o in page.get("Contents", [])
              for m in re.findall(r"/(epoch\d{4}-step\d{7})/", o["Key"])}
    assert stored and stored <= registered, f"unregistered checkpoints left: {sorted(stored - registered)}"


def split_keys(manifest: ShardManifest, s3: S3Access) -> collections.Counter:
    return collections.Counter(s["__key__"] for shard in manifest.split("train").shards
                               for s in read_shard(shard, access=s3))


GROUP_START_S = 15  # the workers of one group take their first step within this of each other


def check_lineage(log: list[dict], expected: collections.Counter, epochs: int) -> dict[int, int]:
    """Every epoch's lineage trains each sample once; returns the steps each rank ran more than once.

    A restarted worker group (new pids, perhaps another number of them) resumes after its checkpoint: what
    an earlier group trained from that point on was lost with it, whichever ranks it had."""
    first: dict[int, tuple] = {}  # pid → (epoch, step, time) of its first step
    for record in sorted(log, key=lambda r: r["time"]):
        first.setdefault(record["pid"], (record["epoch"], record["step"], record["time"]))
    groups: list[tuple[tuple, float, set[int]]] = []  # (where it started, when, pids), in the order they started
    for pid, (epoch, step, started) in sorted(first.items(), key=lambda item: item[1][2]):
        if groups and groups[-1][0] == (epoch, step) and started - groups[-1][1] < GROUP_START_S:
            groups[-1][2].add(pid)
        else:
            groups.append(((epoch, step), started, {pid}))
    kept = []
    for index, (_, _, pids) in enumerate(groups):
        until = groups[index + 1][0] if index + 1 < len(groups) else (epochs, 0)
        kept += [r for r in log if r["pid"] in pids and (r["epoch"], r["step"]) < until]
    for epoch in range(epochs):
        trained = collections.Counter(k for r in kept if r["epoch"] == epoch for k in r["keys"])
        assert trained == expected, (f"epoch {epoch}: lost {sorted(expected - trained)[:5]}, "
                                     f"twice {sorted(k for k, n in trained.items() if n > 1)[:5]}")
    runs = collections.Counter((r["epoch"], r["step"], r["rank"]) for r in log)
    redone = collections.Counter()
    for (_, _, rank), count in runs.items():
        redone[rank] += count - 1
    return dict(redone)


def kill_rank(tmp_path: Path, rank: int) -> set[int]:
    """SIGKILL the worker of `rank`; the pids that had trained until then."""
    log = sample_log(tmp_path)
    os.kill([r["pid"] for r in log if r["rank"] == rank][-1], signal.SIGKILL)
    return {r["pid"] for r in log}


def first_new_step(log: list[dict], old_pids: set[int], rank: int) -> tuple[int, int]:
    """(epoch, step) of the first step a worker started after `old_pids` ran: where training resumed."""
    return next((r["epoch"], r["step"]) for r in log if r["rank"] == rank and r["pid"] not in old_pids)


class Submitted:
    """A submission seen as a process: `poll()` is None while it runs, `stderr` is its log."""

    def __init__(self, settings: Settings, submission_id: str) -> None:
        from ray.job_submission import JobSubmissionClient

        self.client = JobSubmissionClient(settings.ray_dashboard_url)
        self.id = submission_id

    def poll(self) -> str | None:
        status = self.client.get_job_status(self.id)
        return status.value if status.is_terminal() else None

    @property
    def stderr(self) -> io.StringIO:
        return io.StringIO(self.logs())

    def logs(self) -> str:
        return self.client.get_job_logs(self.id)

    def wait(self, timeout_s: float = JOB_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while (status := self.poll()) is None:
            assert time.monotonic() < deadline, f"{self.id} still running after {timeout_s} s:\n{self.logs()[-4000:]}"
            time.sleep(1)
        return status


def retried(settings: Settings, submission_id: str, timeout_s: float = 180) -> Submitted:
    """The submission the compound server made to retry `submission_id` (NAME-N: NAME-N+1), once Ray has it."""
    name, number = submission_id.rsplit("-", 1)
    retry = Submitted(settings, f"{name}-{int(number) + 1}")
    deadline = time.monotonic() + timeout_s
    while not any(j.submission_id == retry.id for j in retry.client.list_jobs()):
        assert time.monotonic() < deadline, f"the server did not submit {submission_id} again as {retry.id}"
        time.sleep(1)
    return retry


def submit(spec_path: Path, stack: Stack, settings: Settings, *options: str, group: str = "job") -> Submitted:
    """`compound job submit SPEC` (or `sweep submit`, by `group`), checked to have printed its dashboard link."""
    result = CliRunner().invoke(cli, [group, "submit", str(spec_path), "--home", str(stack.home), *options])
    assert result.exit_code == 0, result.output
    submission_id = re.search(r"as (\S+)\n", result.output).group(1)
    assert f"{settings.ray_dashboard_url}/#/jobs/{submission_id}" in result.output
    return Submitted(settings, submission_id)


def job_runs(client, job: str) -> list:
    """The MLflow runs tagged with the job's name, in any experiment."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`{JOB_TAG}` = '{job}'")
