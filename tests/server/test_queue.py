"""The server's queue on the real local stack: two teams on a cluster with room for one job, priorities,
a team quota, idempotent submission keys, and a restart of the server with jobs queued and running."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
import yaml
from click.testing import CliRunner

from compound.cli import cli
from infra.settings import Settings
from infra.stack import Stack
from jobs.driver_log import read_kept
from jobs.lease import LEASE_FILE, held
from jobs.submit import JobsClient
from tests.jobs.helpers import SMOKE


def _invoke(stack: Stack, *args: str, token: str | None = None):
    env = {"COMPOUND_SERVER_TOKEN": token} if token else None
    return CliRunner().invoke(cli, [*args, "--home", str(stack.home)], env=env)


def _user(stack: Stack, team: str, role: str = "submitter") -> str:
    made = _invoke(stack, "user", "add", f"{team}-{role}", "--team", team, "--role", role, "--json")
    assert made.exit_code == 0, made.output
    return json.loads(made.output)["token"]


def _queue(stack: Stack) -> dict[str, dict]:
    shown = _invoke(stack, "queue", "--json")
    assert shown.exit_code == 0, shown.output
    return {entry["name"]: entry for entry in json.loads(shown.output)}


def _eventually(condition, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return found


@pytest.fixture
def whole_cluster_job(tmp_path, digits):
    """Specs of a tiny job whose one worker takes every CPU of the stack's one node: room for one at once."""
    base = yaml.safe_load(SMOKE.read_text())

    def spec(name: str):
        job = {**base, "name": f"{name}-{uuid.uuid4().hex[:4]}",
               "scaling": {"num_workers": 1, "cpus_per_worker": os.cpu_count() or 1},
               "model": {**base["model"], "resolution": 32}, "optim": {**base["optim"], "epochs": 1}}
        path = tmp_path / f"{job['name']}.yaml"
        path.write_text(yaml.safe_dump(job))
        return path, job["name"]
    return spec


def test_two_teams_share_room_for_one_job_by_priority_and_quota_and_a_server_restart_loses_and_doubles_nothing(
        settings: Settings, stack: Stack, whole_cluster_job) -> None:
    tag = uuid.uuid4().hex[:4]
    team_a, team_b = f"qa{tag}", f"qb{tag}"
    alice, bob, viewer = _user(stack, team_a), _user(stack, team_b), _user(stack, team_b, "viewer")
    assert _invoke(stack, "queue", "quota", team_a, "--jobs", "1").exit_code == 0

    (a1, a1_name), (a2, a2_name), (b1, b1_name), (b2, b2_name) = (whole_cluster_job(n) for n in ("a1", "a2", "b1", "b2"))
    first = _invoke(stack, "job", "submit", str(a1), token=alice)
    assert first.exit_code == 0 and "Ray dashboard:" in first.output, first.output  # room: it starts at once
    waits = _invoke(stack, "job", "submit", str(a2), token=alice)
    assert waits.exit_code == 0 and "queued at position 1" in waits.output, waits.output
    low = _invoke(stack, "job", "submit", str(b1), "--priority", "low", "--key", f"b1-{tag}", token=bob)
    high = _invoke(stack, "job", "submit", str(b2), "--priority", "high", token=bob)
    assert low.exit_code == 0 and high.exit_code == 0, low.output + high.output
    # The same key gives back the same submission; the same job without one is refused while it waits.
    again = _invoke(stack, "job", "submit", str(b1), "--priority", "low", "--key", f"b1-{tag}", token=bob)
    assert again.exit_code == 0 and f"as {b1_name}-1" in again.output, again.output
    twice = _invoke(stack, "job", "submit", str(b1), token=bob)
    assert twice.exit_code == 1 and "already queued" in twice.output, twice.output
    refused = _invoke(stack, "job", "submit", str(b1), token=viewer)
    assert refused.exit_code == 1 and "403" in refused.output, refused.output

    def order_is_kept() -> None:
        queue = _queue(stack)
        assert queue[a1_name]["state"] == "started"
        # high before normal before low; team a's next one also waits for its quota, which holds back no one.
        assert [queue[n]["position"] for n in (b2_name, a2_name, b1_name)] == [1, 2, 3], queue
        assert queue[b2_name]["reason"].startswith("waits for room: needs")
        assert queue[a2_name]["reason"] == f"team {team_a} is at its quota of 1 running submission(s)"
        assert queue[b1_name]["reason"] == f"behind {b2_name}-1, which waits for room and goes first"
    _eventually(lambda: order_is_kept() or True, "the queue's reasons")
    listed = json.loads(_invoke(stack, "job", "list", "--json").output)
    assert {s["job"] for s in listed if s["status"] == "QUEUED"} == {a2_name, b1_name, b2_name}

    # The server restarted: the queue as it was, the running job re-attached, nothing started twice.
    assert stack.stop_service("server", grace_s=0)
    stack.up()
    order_is_kept()
    ray = JobsClient(settings.ray_dashboard_url, settings.ray_token)
    assert [s.submission_id for s in ray.submissions() if s.job in (a1_name, a2_name, b1_name, b2_name)] == [
        f"{a1_name}-1"]

    # Room again: the high-priority job starts before the normal one queued earlier.
    stopped = _invoke(stack, "job", "stop", a1_name, token=alice)
    assert stopped.exit_code == 0 and "STOPPED" in stopped.output, stopped.output
    _eventually(lambda: _queue(stack)[b2_name]["state"] == "started", "the high-priority job to start")
    assert _queue(stack)[a2_name]["state"] == "queued"
    _eventually(lambda: ray.find(f"{b2_name}-1").status == "RUNNING", "Ray to run it", timeout_s=180)
    # Only the team or an admin stops a job; a job taken out of the queue never runs.
    assert _invoke(stack, "job", "stop", b2_name, token=alice).exit_code == 1
    assert "CANCELLED" in _invoke(stack, "job", "stop", b1_name, token=bob).output
    assert _invoke(stack, "job", "stop", b2_name, token=bob).exit_code == 0
    _eventually(lambda: _queue(stack)[a2_name]["state"] == "started", "team a's next job to start")
    assert _invoke(stack, "job", "stop", a2_name, token=alice).exit_code == 0
    assert b1_name not in {s.job for s in ray.submissions()}

    audit = json.loads(_invoke(stack, "audit", "--json", "--limit", "200").output)
    seen = {(e["who"], e["action"], e["outcome"]) for e in audit}
    assert {(f"{team_a}-submitter", "submission.add", "ok"), (f"{team_b}-submitter", "submission.stop", "ok"),
            (f"{team_a}-submitter", "submission.stop", "denied"), (f"{team_b}-viewer", "submission.add", "denied"),
            ("owner", "quota.set", "ok")} <= seen


def test_the_ray_head_restarted_mid_job_the_server_resubmits_it_and_every_log_is_read_whole(
        settings: Settings, stack: Stack, digits, tmp_path, s3) -> None:
    """A running job whose Ray head restarts is submitted again by the server and completes; a job its lease
    refused (another driver holds it: here, this test) fails at once and is not retried. Both logs are
    read from S3 once the new head has forgotten the submissions."""
    from tests.jobs.helpers import (
        check_lineage,
        latest_uploaded,
        make_spec,
        retried,
        sample_log,
        split_keys,
        submit,
        wait_for,
    )

    (tmp_path / "blocked").mkdir()
    blocked_path, blocked = make_spec(tmp_path / "blocked", model={"resolution": 32}, optim={"epochs": 1})
    lease = f"s3://checkpoints/jobs/{blocked['name']}/{LEASE_FILE}"
    with held(s3, lease, what=f"job {blocked['name']}", holder="a driver run by hand"):
        refused = submit(blocked_path, stack, settings)
        assert refused.wait(timeout_s=120) == "FAILED"
    assert "already being run by a driver run by hand" in refused.logs()

    # Two epochs (a minute or more here): the head stops well before the job could end.
    spec_path, spec = make_spec(tmp_path, model={"resolution": 32}, optim={"epochs": 2},
                                checkpoint={"every_steps": 10})
    first = submit(spec_path, stack, settings)
    wait_for(lambda: latest_uploaded(s3, spec) >= (0, 0), "a first checkpoint", first, timeout_s=200)
    # The driver copies its log to S3 every UPLOAD_S: the head goes once a copy holds training steps.
    wait_for(lambda: "epoch 0 step" in (read_kept(s3, settings.checkpoints_bucket, first.id) or ("", ""))[1],
             "steps in the kept log", first)
    # Killed: drained instead (`ray stop`), the head lets the job run on for half a minute, in which a job this
    # short may finish. A driver that finds its workers or its Ray Train controller lost exits 75 and is
    # retried as well (test_cluster_failures.py).
    stack.stop_service("ray", grace_s=0)
    stack.up()  # a new head, which knows nothing of either job: the server submits the running one again

    second = retried(settings, first.id)
    assert second.wait() == "SUCCEEDED", second.logs()[-6000:]
    assert "resuming from its latest checkpoint" in second.logs()
    check_lineage(sample_log(tmp_path), split_keys(digits, s3), epochs=2)
    logs = _invoke(stack, "job", "logs", spec["name"])
    assert logs.exit_code == 0, logs.output
    assert f"--- attempt 1: {first.id} (Ray no longer knows it" in logs.output
    before, after = logs.output.split(f"--- attempt 2: {second.id} ---")
    assert "epoch 0 step" in before and "resuming from its latest checkpoint" in after

    for ref in (refused.id, blocked["name"]):  # failed by its spec's circumstances: not retried, its log kept
        logs = _invoke(stack, "job", "logs", ref)
        assert logs.exit_code == 0, logs.output
        assert "already being run by a driver run by hand" in logs.output and "kept on S3" in logs.output
    assert blocked["name"] not in {s.job for s in JobsClient(settings.ray_dashboard_url, settings.ray_token)
                                   .submissions()}
    missing = _invoke(stack, "job", "logs", "no-such-job")
    assert missing.exit_code == 1 and "no submission or job named 'no-such-job'" in missing.output
