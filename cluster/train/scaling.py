"""Ray Train's elastic scaling, counting only the nodes that stay.

Ray's `ElasticScalingPolicy` sizes a worker group from the AutoscalingCoordinator's view of the cluster,
which that actor refreshes every 20 s and in which a draining node is as alive as any. A preempted job
restarts at the drain deadline, while the node is still going: Ray then asks for the old size, and the
new group waits out Ray Train's whole start-up limit for a worker with nowhere to run before it starts
smaller. Taking draining and dead nodes out of that view first makes the restart ask for what is there,
and keeps a growing job off a node that is about to leave.

Installed through `TorchTrainer._initialize_and_run_controller`, the one place Ray builds its policy
(Ray is pinned; the trainer test fails if that seam moves).
"""

from __future__ import annotations

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy


def leaving_nodes() -> set[str]:
    """Hex ids of the nodes that are draining or dead."""
    dead = {node["NodeID"] for node in ray.nodes() if not node["Alive"]}
    return dead | set(ray._private.state.state.get_draining_nodes())


class StayingNodesPolicy(ElasticScalingPolicy):
    """`ElasticScalingPolicy` over the nodes that are neither draining nor dead."""

    def _get_reserved_resources(self):
        reserved = super()._get_reserved_resources()
        if not reserved:
            return reserved
        leaving = leaving_nodes()
        return {node: resources for node, resources in reserved.items() if node not in leaving}


class ElasticTorchTrainer(TorchTrainer):
    """A `TorchTrainer` whose elastic jobs size themselves with `StayingNodesPolicy`."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if self.scaling_config.elasticity_enabled:
            controller_init_kwargs["scaling_policy"] = StayingNodesPolicy(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
