"""What a worker group does when Ray says a node of it goes (a drain, a spot reclaim): checkpoint at once,
train on while the deadline leaves room, checkpoint again as late as it allows, then wait to be torn down.

Ray Train restarts the group once the node is gone (a preemption: its own budget, apart from
max_failures) and the job resumes from that last checkpoint, so what a preemption costs in training is
at most the step under way. Every rank asks at every optimiser step: Ray agrees on one notice across
them, and rank 0's decision to stop is broadcast, so all ranks checkpoint at the same step.
"""

from __future__ import annotations

import logging
import time
from enum import Enum

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MARGIN_S = 2.0  # beyond one more step and a checkpoint: the upload of the last one must land before the node goes
CHECKPOINT_SLACK = 2.0  # × the last checkpoint's time: the last one may be slower (the ranks' uploads contend)
HOLD_PAST_DEADLINE_S = 120.0  # a node drained but still up this long after its deadline: train on
STEP_TIME_WEIGHT = 0.3  # of the newest step in the running estimate of a step's time


class Action(Enum):
    TRAIN = "train"
    CHECKPOINT = "checkpoint"  # a new notice: checkpoint now, then train on
    CHECKPOINT_AND_HOLD = "checkpoint and hold"  # the deadline is near: the last checkpoint, then no more steps


class PreemptionGuard:
    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank, self.device = rank, device
        self.notice = None  # the notice acted on (ray.train.PreemptionInfo)
        self.step_s = 0.0  # a step's time, estimated
        self.checkpoint_s = 0.0  # the last checkpoint's time, upload included (they upload at once after a notice)
        self._last: float | None = None
        self._held = False

    def at_optimizer_step(self, then_s: float = 0.0) -> Action:
        """Called by every rank after every optimiser step. `then_s`: what runs after the next step before the
        next chance to checkpoint (the epoch's evaluation, when the next step ends the epoch)."""
        import ray.train

        now = time.monotonic()
        if self._last is not None:
            self.step_s = (1 - STEP_TIME_WEIGHT) * self.step_s + STEP_TIME_WEIGHT * (now - self._last) \
                if self.step_s else now - self._last
        self._last = now
        notice = ray.train.get_preemption_info()
        if notice is None:
            return Action.TRAIN
        if notice != self.notice:
            self.notice, self._held = notice, False
            if self.rank == 0:
                deadline = f"at {time.strftime('%H:%M:%S', time.localtime(notice.deadline_ms / 1000))}" \
                    if notice.deadline_ms else "without a deadline"
                log.warning("nodes %s of this job go %s (ranks %s): checkpointing now",
                            ", ".join(n[:8] for n in notice.preempted_node_ids), deadline, notice.preempted_ranks)
            return Action.CHECKPOINT
        if notice.deadline_ms is None or self._held:
            return Action.TRAIN
        left = notice.deadline_ms / 1000 - time.time()
        needed = 2 * self.step_s + then_s + CHECKPOINT_SLACK * self.checkpoint_s + MARGIN_S
        late = torch.tensor([float(left < needed)], device=self.device)
        if dist.is_initialized():
            dist.broadcast(late, src=0)  # the ranks' clocks and estimates differ: rank 0 decides for all
        if not late.item():
            return Action.TRAIN
        self._held = True
        return Action.CHECKPOINT_AND_HOLD

    def checkpointed(self, seconds: float) -> None:
        self.checkpoint_s = seconds
        self._last = time.monotonic()  # the checkpoint is not a step's time

    def hold(self) -> None:
        """Wait for Ray to tear the group down at the notice's deadline; train on if the node outlives it."""
        assert self.notice is not None and self.notice.deadline_ms is not None
        until = self.notice.deadline_ms / 1000 + HOLD_PAST_DEADLINE_S
        if self.rank == 0:
            log.warning("checkpointed as late as the deadline allows: waiting for the node to go")
        while time.time() < until:
            time.sleep(1.0)
        if self.rank == 0:
            log.warning("the node outlived its deadline by %.0f s: training on", HOLD_PAST_DEADLINE_S)
        self._last = time.monotonic()
