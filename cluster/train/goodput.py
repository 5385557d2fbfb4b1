"""What a job's workers spent on training that stayed, against what they were given: its goodput.

    goodput = productive worker-seconds ÷ allocated worker-seconds

A worker group's time counts from the moment it starts, times its workers. Productive is the part spent in
the steps and evaluations a checkpoint kept: not the start-up before the first step, not writing
checkpoints, not waiting out a drain. A restart resumes from a checkpoint taken at `saved_at`; everything
from there to the new group's start (the steps redone, noticing the failure, starting again) was
allocated to the old group's workers and lost; `lost_s` adds the new group's start-up, up to its first
step. The ledger lives in the checkpoint, so it goes on across restarts and counts only what a checkpoint
kept: the steps after the last one are redone, and counted when they are done again. A worker group that
never wrote a checkpoint is so not in it at all: its time is in the loss of the restart after it, and
`restarts` counts the restarts the kept history went through.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields


@dataclass
class GoodputLedger:
    """Sums over the whole job, as of the last checkpoint (rank 0's; every rank keeps the same time)."""

    productive_worker_s: float = 0.0
    allocated_worker_s: float = 0.0
    restarts: int = 0  # worker groups started from a checkpoint
    preempted_nodes: list[str] = field(default_factory=list)  # the nodes whose drain notice the job acted on
    lost_s: float = 0.0  # over all restarts
    saved_at: float | None = None  # time.time() of the checkpoint this ledger is in

    @property
    def goodput(self) -> float:
        return self.productive_worker_s / self.allocated_worker_s if self.allocated_worker_s else 1.0

    @property
    def preemptions(self) -> int:
        return len(self.preempted_nodes)

    def preempted(self, node_ids: list[str]) -> None:
        """A drain notice for these nodes (Ray may announce one node's drain again, changed: counted once)."""
        self.preempted_nodes += [node for node in node_ids if node not in self.preempted_nodes]

    def state(self) -> dict:
        return asdict(self)


class GoodputClock:
    """One worker group's running account of its time, started when the group starts."""

    def __init__(self, ledger: dict | None, *, started_at: float, world_size: int, world_before: int,
                 resumed: bool) -> None:
        known = {f.name for f in fields(GoodputLedger)}
        self.ledger = GoodputLedger(**{k: v for k, v in (ledger or {}).items() if k in known})
        self.world_size = world_size
        self._mark = started_at  # time.time() up to which the ledger counts
        self._overhead = 0.0  # seconds since the mark that were not productive
        self._first_step: float | None = None
        self._resumed_gap: float | None = None
        if resumed and self.ledger.saved_at is not None:
            self._resumed_gap = max(0.0, self._mark - self.ledger.saved_at)
            self.ledger.allocated_worker_s += self._resumed_gap * world_before
            self.ledger.restarts += 1

    @property
    def stepping(self) -> bool:
        return self._first_step is not None

    def first_step_done(self, step_s: float) -> float | None:
        """At the end of this group's first step (which took `step_s`): the start-up before it was overhead.
        Returns what the restart lost, from the checkpoint it resumed from to that step (None for a job's
        first group)."""
        self._first_step = time.time() - step_s
        startup = max(0.0, self._first_step - self._mark)
        self._overhead += startup
        if self._resumed_gap is None:
            return None
        self.ledger.lost_s += self._resumed_gap + startup
        return self._resumed_gap + startup

    def overhead(self, seconds: float) -> None:
        """Time since the mark that trained nothing (a checkpoint written, a drain waited out)."""
        self._overhead += seconds

    def close_books(self) -> GoodputLedger:
        """The ledger up to now, as a checkpoint taken now keeps it."""
        now = time.time()
        elapsed = now - self._mark
        self.ledger.allocated_worker_s += elapsed * self.world_size
        self.ledger.productive_worker_s += max(0.0, elapsed - self._overhead) * self.world_size
        self.ledger.saved_at, self._mark, self._overhead = now, now, 0.0
        return self.ledger
