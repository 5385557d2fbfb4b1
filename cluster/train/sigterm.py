"""A SIGTERM to a training worker is a preemption notice, as a node's drain is.

Schedulers that take a node back by signalling its processes (Slurm's preemption, a container stopped)
send SIGTERM and kill after a grace period. Ray's worker process exits at SIGTERM, which would cost the
steps since the last checkpoint and count against `max_failures`. Instead every worker of a group marks,
on SIGTERM, a preemption of its rank with a deadline `grace_s` away on every worker of the group, as Ray's
drain watcher does for a node: the ranks checkpoint at the next step (`preemption.PreemptionGuard`), Ray
Train's controller sees the notice in its poll, waits for the deadline and restarts the group, counting a
preemption.

Python runs a signal's handler in the process's main thread only, when the interpreter next checks for
signals there; Ray Train trains in a thread of its own while the main thread waits in Ray's task loop, and
a handler installed there ran 20 s late (at the group's teardown) in the smoke drill. The signal's C
handler, though, writes its number at once to the wakeup fd (`signal.set_wakeup_fd`), so a thread of
ours reads it there and sends the notice. Both are set in the worker actor's main thread, through one
of its methods (`WorkerGroup.execute`), after each group starts.

Ray itself ends workers with SIGTERM too: at a group's shutdown or abort (the handler is taken back first)
and when their controller is gone (a sweep's trial stopped): a worker whose controller does not answer
exits, as Ray meant.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

import ray
from ray.train.v2._internal.execution.callback import WorkerGroupCallback

log = logging.getLogger(__name__)

RESTORE_TIMEOUT_S = 2.0
CONTROLLER_TIMEOUT_S = 5.0
_installed: list[tuple] = []  # this process's (Ray's handler, the wakeup fd before, our pipe's write end)


class SigtermNotice(WorkerGroupCallback):
    """Installs `on_sigterm_notify_group` in every worker of each group Ray Train starts."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.group = None  # the worker group running

    def after_worker_group_start(self, worker_group) -> None:
        self.group = worker_group
        peers = [worker.actor for worker in worker_group.get_workers()]
        worker_group.execute(on_sigterm_notify_group, peers, self.grace_s)

    def before_worker_group_shutdown(self, worker_group) -> None:
        self._restore()

    def before_worker_group_abort(self, worker_group_context) -> None:
        self._restore()

    def _restore(self) -> None:
        """Ray ends a group's workers with SIGTERM too: that one is no notice. A dead worker's call fails at
        once, and nothing here raises: a shutdown must go on."""
        if self.group is None:
            return
        calls, self.group = self.group.execute_async(restore_sigterm), None
        ray.wait(calls, num_returns=len(calls), timeout=RESTORE_TIMEOUT_S)


def on_sigterm_notify_group(peers: list, grace_s: float) -> None:
    """Run in a worker actor's main thread: from now on SIGTERM marks this rank preempted on every peer."""
    from ray.train.v2._internal.execution.context import get_train_context
    from ray.train.v2.api.preemption import PreemptionInfo

    context = get_train_context()
    rank, controller = context.get_world_rank(), context.controller_actor
    node = ray.get_runtime_context().get_node_id()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # the C handler must never block on it
    handler = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # what a signal does is `watch`'s, below
    earlier = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    _installed.append((handler, earlier, write_end))

    def watch() -> None:
        notice = None  # the first SIGTERM's: a repeat sends the same
        while received := os.read(read_end, 64):
            if earlier != -1:  # whoever had the wakeup fd before still gets every signal
                with contextlib.suppress(OSError):
                    os.write(earlier, received)
            if signal.SIGTERM not in received:
                continue
            if not _answers(controller):  # its controller gone (a sweep's trial stopped): Ray ends this worker
                os._exit(1)
            if notice is None:
                notice = PreemptionInfo(deadline_ms=int((time.time() + grace_s) * 1000),
                                        preempted_node_to_ranks={node: [rank]})
                log.warning("rank %d got SIGTERM: a preemption notice, %.0f s to go", rank, grace_s)
            for peer in peers:
                peer.mark_preempt.remote(notice)
        os.close(read_end)

    threading.Thread(target=watch, name="SIGTERM notice", daemon=True).start()


def restore_sigterm() -> None:
    """Run in a worker actor's main thread: SIGTERM does what it did before, and `watch` ends."""
    while _installed:
        handler, earlier, write_end = _installed.pop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(earlier)
        os.close(write_end)  # `watch` reads the end of the pipe


def _answers(actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=CONTROLLER_TIMEOUT_S)
    except Exception:  # noqa: BLE001 — dead, or too far gone to answer: either way no one restarts this group
        return False
    return True
