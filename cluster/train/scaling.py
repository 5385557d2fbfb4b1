"""Ray Train's elastic scaling, counting only the nodes that stay.

Ray's `ElasticScalingPolicy` sizes a worker group from the AutoscalingCoordinator's view of the cluster,
which that actor refreshes every 20 s and in which a draining node is as alive as any. A preempted job
restarts at the drain deadline, while the node is still going: Ray then asks for the old size, and the
new group waits out Ray Train's whole start-up limit for a worker with nowhere to run before it starts
smaller. Taking draining and dead nodes out of that view first makes the restart ask for what is there,
and keeps a growing job off a node that is about to leave.

Growing restarts the group from its latest checkpoint too, whenever Ray sees the room, so it would redo the
steps since that checkpoint. The policy holds a decision to grow until the workers report a checkpoint (it
is on storage by then: uploads finish before their report) and grows at that boundary. It never shrinks a
running group: a node of it that drains sends its notice (the group checkpoints, then restarts at the
deadline), and shrinking at once, as this view alone would, lost the steps since the last checkpoint.

A node killed without notice stays alive in GCS's view until its health checks have failed for a while
(15 s by Ray's defaults), and the worker group fails within a second or two: the restart would ask for the
old size and wait out the start-up limit too (seen: 3 minutes in the drill). So before a restart the policy
knocks at the raylet of each node the last group ran on; one that refuses or does not answer is gone.

Installed through `TorchTrainer._initialize_and_run_controller`, the one place Ray builds its policy (Ray
is pinned; if that seam moves, the elastic drill's restart waits out the start-up limit and fails).
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy import (
    ElasticScalingPolicy,
    NoopDecision,
    ResizeDecision,
    ScalingDecision,
)

PROBE_TIMEOUT_S = 2.0  # a raylet's port accepts in the kernel, however busy the node: silence this long is death


def leaving_nodes() -> set[str]:
    """Hex ids of the nodes that are draining or dead."""
    dead = {node["NodeID"] for node in ray.nodes() if not node["Alive"]}
    return dead | set(ray._private.state.state.get_draining_nodes())


def answers(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def silent_nodes(node_ids: set[str]) -> set[str]:
    """Of these nodes, those alive to GCS whose raylet refuses or ignores a connection: dead, not yet declared."""
    if not node_ids:
        return set()
    raylets = {node["NodeID"]: (node["NodeManagerAddress"], node["NodeManagerPort"])
               for node in ray.nodes() if node["NodeID"] in node_ids and node["Alive"]}
    if not raylets:
        return set()
    with ThreadPoolExecutor(max_workers=min(len(raylets), 32)) as pool:
        return {node for node, up in zip(raylets, pool.map(answers, raylets.values())) if not up}


class StayingNodesPolicy(ElasticScalingPolicy):
    """`ElasticScalingPolicy` over the nodes that are neither draining nor dead, growing at checkpoints."""

    def __init__(self, scaling_config) -> None:
        super().__init__(scaling_config)
        self.growth: ResizeDecision | None = None  # held until the next checkpoint
        self.checkpointed: set[int] = set()  # the ranks that have reported their part of it
        self.group_nodes: set[str] = set()  # those the running group has workers on
        self._restarting = False

    def make_decision_for_non_running_worker_group(self) -> ScalingDecision:
        self.growth, self.checkpointed, self._restarting = None, set(), True
        try:
            return super().make_decision_for_non_running_worker_group()
        finally:
            self._restarting = False

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status) -> ScalingDecision:
        self.group_nodes = {worker.metadata.node_id for worker in worker_group_state.workers}
        decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
        if isinstance(decision, ResizeDecision):
            if decision.num_workers < worker_group_state.num_workers:
                # A draining node, which this view leaves out: its notice makes the checkpoint and the restart.
                return NoopDecision()
            if self.growth is None:
                self.checkpointed = set()
            self.growth = decision
        if self.growth is None:
            return NoopDecision()
        self.checkpointed |= {rank for rank, status in worker_group_status.worker_statuses.items()
                              if status.training_report is not None and status.training_report.checkpoint is not None}
        if len(self.checkpointed) < worker_group_state.num_workers:
            return NoopDecision()
        decision, self.growth, self.checkpointed = self.growth, None, set()
        return decision

    def _get_reserved_resources(self):
        reserved = super()._get_reserved_resources()
        if not reserved:
            return reserved
        leaving = leaving_nodes()
        if self._restarting:
            leaving |= silent_nodes(self.group_nodes - leaving)
        return {node: resources for node, resources in reserved.items() if node not in leaving}


class ElasticTorchTrainer(TorchTrainer):
    """A `TorchTrainer` whose elastic jobs size themselves with `StayingNodesPolicy`."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if self.scaling_config.elasticity_enabled:
            controller_init_kwargs["scaling_policy"] = StayingNodesPolicy(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
