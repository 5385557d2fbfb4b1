"""The queue's decisions alone (`server.queue.decide`): priority classes, first in first out within one,
no backfill past a submission that waits for room, and team quotas that hold back only their team; and
which ended submissions it retries (`infrastructure_failure`)."""

from __future__ import annotations

import pytest

from jobs.submit import INFRASTRUCTURE_EXIT, Submission
from server.queue import PRIORITIES, QUEUED, STARTED, Entry, Quota, decide, infrastructure_failure

CLUSTER = {"CPU": 4.0, "GPU": 2.0}


def _entry(name: str, *, team: str = "a", priority: str = "normal", at: float = 0.0, cpus: float = 2.0,
           gpus: float = 0.0, state: str = QUEUED) -> Entry:
    needs = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return Entry(submission_id=f"{name}-1", kind="job", name=name, user="u", team=team, priority=PRIORITIES[priority],
                 state=state, enqueued=at, needs=needs)


def _started(waiting, running=(), quotas=None) -> tuple[list[str], dict[str, str]]:
    starting, why = decide(list(waiting), list(running), CLUSTER, quotas or {})
    return [e.name for e in starting], why


def test_a_higher_class_goes_first_and_a_class_is_first_in_first_out() -> None:
    waiting = [_entry("old-low", priority="low", at=1), _entry("late-high", priority="high", at=3),
               _entry("early-high", priority="high", at=2)]
    started, why = _started(waiting)
    assert started == ["early-high", "late-high"]  # 2 + 2 CPUs: the cluster is full
    assert why["old-low-1"].startswith("waits for room: needs 2 CPU; free now 0 CPU")


def test_nothing_passes_one_that_waits_for_room() -> None:
    running = [_entry("big-run", cpus=3, state=STARTED)]
    waiting = [_entry("wide", at=1, cpus=2), _entry("small", at=2, cpus=1)]
    started, why = _started(waiting, running)
    assert started == []  # `small` would fit, but `wide` came first and would wait for ever behind small ones
    assert "waits for room" in why["wide-1"] and why["small-1"].startswith("behind wide-1")


def test_a_team_at_its_quota_waits_and_holds_back_no_one_else() -> None:
    running = [_entry("a-run", team="a", cpus=1, state=STARTED)]
    waiting = [_entry("a-next", team="a", priority="high", at=1, cpus=1), _entry("b-next", team="b", at=2, cpus=1)]
    started, why = _started(waiting, running, {"a": Quota(jobs=1)})
    assert started == ["b-next"]
    assert why["a-next-1"] == "team a is at its quota of 1 running submission(s)"


def test_cpu_and_gpu_quotas_count_what_the_team_holds() -> None:
    running = [_entry("g1", team="a", cpus=1, gpus=1, state=STARTED)]
    waiting = [_entry("g2", team="a", at=1, cpus=1, gpus=1), _entry("c2", team="a", at=2, cpus=2)]
    started, why = _started(waiting, running, {"a": Quota(gpus=1, cpus=4)})
    assert started == ["c2"]
    assert "holds 1 of its quota of 1 GPU" in why["g2-1"]
    started, why = _started(waiting, running, {"a": Quota(cpus=2)})
    assert started == ["g2"] and "holds 2 of its quota of 2 CPU" in why["c2-1"]


def test_what_the_queue_started_counts_against_the_room_of_the_rest() -> None:
    started, _ = _started([_entry("one", at=1, cpus=3), _entry("two", at=2, cpus=2)])
    assert started == ["one"]
    started, _ = _started([_entry("x", at=1, cpus=2), _entry("y", at=2, cpus=2), _entry("z", at=3, cpus=1)])
    assert started == ["x", "y"]


def test_room_counts_the_nodes_an_autoscaler_may_add(monkeypatch) -> None:
    """No autoscaling cluster here: the node groups its GCS would report are given."""
    import types

    from jobs import capacity
    from server.queue import Queue

    alive = types.SimpleNamespace(capacity=lambda: [{"CPU": 8.0}])
    queue = Queue(engine=None, settings=lambda: types.SimpleNamespace(ray_address="head:6379"))
    monkeypatch.setattr(capacity, "autoscaling_groups", lambda address: [({"CPU": 8.0, "GPU": 1.0}, 3)])
    assert queue._room(alive) == {"CPU": 32.0, "GPU": 3.0}
    queue._groups_read = -1e9  # read again: a group without a limit
    monkeypatch.setattr(capacity, "autoscaling_groups", lambda address: [({"CPU": 8.0, "GPU": 1.0}, -1)])
    assert queue._room(alive) == {"CPU": float("inf"), "GPU": float("inf")}


def _ended(status: str, exit_code: int | None, error_type: str | None = None) -> Submission:
    return Submission(submission_id="j-1", job="j", status=status, message="", start_time=1.0, end_time=2.0,
                      experiment=None, spec=None, exit_code=exit_code, error_type=error_type)


@pytest.mark.parametrize(("submission", "retried"), [
    (None, True),  # a restarted head no longer knows it
    (_ended("FAILED", -9), True),  # its driver was killed
    (_ended("FAILED", 137), True),
    (_ended("FAILED", None, "JOB_SUPERVISOR_ACTOR_DIED"), True),
    (_ended("FAILED", INFRASTRUCTURE_EXIT), True),  # the driver says the cluster or a service failed it
    (_ended("FAILED", 1, "JOB_ENTRYPOINT_COMMAND_ERROR"), False),  # the job's own failure
    (_ended("FAILED", 2), False),  # a wrong spec
    (_ended("STOPPED", None), False),
    (_ended("SUCCEEDED", 0), False),
])
def test_only_what_the_cluster_failed_is_retried(submission, retried) -> None:
    assert (infrastructure_failure(submission) is not None) == retried
