"""The preemption guard's decision to checkpoint for the last time, on a clock the test moves. Ray's notice
is handed in through `ray.train.get_preemption_info` (the drills in tests/jobs get it from Ray itself)."""

from __future__ import annotations

import pytest
import ray.train
import torch
from ray.train.v2.api.preemption import PreemptionInfo

from cluster.train import preemption
from cluster.train.preemption import Action, PreemptionGuard
from tests.cluster.clock import Clock


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> tuple[PreemptionGuard, Clock]:
    clock = Clock()
    monkeypatch.setattr(preemption.time, "time", clock)
    monkeypatch.setattr(preemption.time, "monotonic", clock)
    notice = PreemptionInfo(deadline_ms=int((clock.now + 20) * 1000), preempted_node_to_ranks={"node": [2]})
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: notice)
    guard = PreemptionGuard(rank=0, device=torch.device("cpu"))
    assert guard.at_optimizer_step() is Action.CHECKPOINT  # the notice: checkpoint at once
    guard.checkpointed(1.0)
    return guard, clock


def test_the_guard_trains_on_while_two_steps_and_two_checkpoints_fit_before_the_deadline(guard) -> None:
    guard, clock = guard
    actions = []
    for _ in range(15):  # steps of 1 s and a checkpoint of 1 s: 2 + 2 × 1 + 2 s of margin needed
        clock.now += 1.0
        actions.append(guard.at_optimizer_step())
    assert actions == [Action.TRAIN] * 14 + [Action.CHECKPOINT_AND_HOLD]  # 5 s left at the last
    assert guard.at_optimizer_step() is Action.TRAIN  # held: the hold, not another checkpoint, comes next


def test_an_evaluation_after_the_next_step_counts_against_the_deadline(guard) -> None:
    guard, clock = guard
    clock.now += 1.0  # 19 s left: room for a step and a checkpoint, not for a 15 s evaluation too
    assert guard.at_optimizer_step(then_s=15.0) is Action.CHECKPOINT_AND_HOLD
