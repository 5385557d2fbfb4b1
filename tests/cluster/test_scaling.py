"""The elastic scaling policy counts workers on the nodes that stay (the drill proves it on a real cluster)."""

from __future__ import annotations

import pytest
from ray.train import ScalingConfig
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, ResizeDecision

from cluster.train import scaling
from cluster.train.scaling import StayingNodesPolicy

NODES = {f"node-{i}": {"CPU": 1.0, "drill": 1.0} for i in range(3)}


def test_a_restart_asks_only_for_the_workers_the_staying_nodes_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ElasticScalingPolicy, "_get_reserved_resources", lambda self: NODES)
    monkeypatch.setattr(ElasticScalingPolicy, "_maybe_send_resource_request", lambda self: None)
    config = ScalingConfig(num_workers=(2, 3), resources_per_worker={"CPU": 1, "drill": 1})

    monkeypatch.setattr(scaling, "leaving_nodes", lambda: set())
    assert StayingNodesPolicy(config).make_decision_for_non_running_worker_group() == ResizeDecision(
        num_workers=3, resources_per_worker={"CPU": 1, "drill": 1})
    monkeypatch.setattr(scaling, "leaving_nodes", lambda: {"node-2"})  # draining, or dead since Ray last looked
    assert StayingNodesPolicy(config).make_decision_for_non_running_worker_group().num_workers == 2
