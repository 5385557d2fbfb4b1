"""The goodput ledger across worker groups, on a clock the test moves."""

from __future__ import annotations

import pytest

from cluster.train import goodput
from cluster.train.goodput import GoodputClock
from tests.cluster.clock import Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(goodput.time, "time", fake)
    return fake


def test_a_job_without_restarts_loses_only_its_start_up_and_checkpoints(clock: Clock) -> None:
    group = GoodputClock(None, started_at=clock.now, world_size=2, world_before=2, resumed=False)
    clock.now += 10  # 9 s of start-up, then a first step of 1 s
    assert group.first_step_done(step_s=1.0) is None
    clock.now += 90
    ledger = group.close_books()  # a checkpoint at 100 s
    assert ledger.allocated_worker_s == 200 and ledger.productive_worker_s == pytest.approx(182)
    group.overhead(5.0)  # writing it
    clock.now += 100
    ledger = group.close_books()
    assert ledger.allocated_worker_s == 400 and ledger.productive_worker_s == pytest.approx(372)
    assert ledger.goodput == pytest.approx(372 / 400) and ledger.restarts == 0


def test_a_restart_charges_the_time_since_its_checkpoint_to_the_old_workers(clock: Clock) -> None:
    first = GoodputClock(None, started_at=clock.now, world_size=3, world_before=3, resumed=False)
    first.first_step_done(step_s=0.0)
    clock.now += 60
    saved = first.close_books().state()  # the checkpoint the restart resumes from
    clock.now += 30  # 30 s of steps redone, a node lost, the group torn down and started again
    second = GoodputClock(saved, started_at=clock.now, world_size=2, world_before=3, resumed=True)
    clock.now += 12
    assert second.first_step_done(step_s=2.0) == pytest.approx(40)  # 30 s gap + 10 s start-up
    clock.now += 48
    ledger = second.close_books()
    assert ledger.restarts == 1 and ledger.lost_s == pytest.approx(40)
    assert ledger.allocated_worker_s == pytest.approx(3 * 60 + 3 * 30 + 2 * 60)
    assert ledger.productive_worker_s == pytest.approx(3 * 60 + 2 * 50)


def test_a_group_that_resumes_a_checkpoint_without_a_ledger_counts_from_its_own_start(clock: Clock) -> None:
    group = GoodputClock(None, started_at=clock.now, world_size=1, world_before=1, resumed=True)
    assert group.first_step_done(step_s=0.0) is None
    clock.now += 10
    ledger = group.close_books()
    assert ledger.restarts == 0 and ledger.goodput == 1.0


def test_a_node_announced_again_is_one_preemption() -> None:
    ledger = GoodputClock(None, started_at=0.0, world_size=3, world_before=3, resumed=False).ledger
    ledger.preempted(["node-a"])
    ledger.preempted(["node-a"])  # the same drain, its notice changed (a later deadline, other ranks)
    ledger.preempted(["node-a", "node-b"])
    assert ledger.preemptions == 2
