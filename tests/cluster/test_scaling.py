"""The elastic scaling policy counts workers on the nodes that stay, and grows at checkpoints (the drill proves
both on a real cluster)."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest
from ray.train import Checkpoint, ScalingConfig
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy, NoopDecision, ResizeDecision
from ray.train.v2._internal.execution.training_report import _TrainingReport
from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus

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


def test_a_restart_after_a_node_died_without_notice_leaves_out_the_node_before_ray_declares_it_dead(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ElasticScalingPolicy, "_get_reserved_resources", lambda self: NODES)
    monkeypatch.setattr(ElasticScalingPolicy, "_maybe_send_resource_request", lambda self: None)
    monkeypatch.setattr(ElasticScalingPolicy, "make_decision_for_running_worker_group", lambda *args: NoopDecision())
    monkeypatch.setattr(scaling, "leaving_nodes", lambda: set())  # GCS has not noticed yet
    listening = socket.create_server(("127.0.0.1", 0))
    closed = socket.create_server(("127.0.0.1", 0))
    raylets = {"node-0": listening.getsockname(), "node-1": listening.getsockname(), "node-2": closed.getsockname()}
    closed.close()
    monkeypatch.setattr(scaling.ray, "nodes", lambda: [
        {"NodeID": node, "Alive": True, "NodeManagerAddress": host, "NodeManagerPort": port}
        for node, (host, port) in raylets.items()])
    policy = StayingNodesPolicy(ScalingConfig(num_workers=(2, 3), resources_per_worker={"CPU": 1, "drill": 1}))
    workers = [SimpleNamespace(metadata=SimpleNamespace(node_id=node)) for node in NODES]
    policy.make_decision_for_running_worker_group(SimpleNamespace(num_workers=3, workers=workers), None)
    try:
        assert policy.make_decision_for_non_running_worker_group().num_workers == 2
    finally:
        listening.close()


def test_a_job_grows_at_its_next_checkpoint_not_when_ray_first_sees_the_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ElasticScalingPolicy, "_get_reserved_resources", lambda self: NODES)
    monkeypatch.setattr(ElasticScalingPolicy, "_maybe_send_resource_request", lambda self: None)
    monkeypatch.setattr(scaling, "leaving_nodes", lambda: set())
    policy = StayingNodesPolicy(ScalingConfig(num_workers=(2, 3), resources_per_worker={"CPU": 1, "drill": 1},
                                              elastic_resize_monitor_interval_s=0))
    group = SimpleNamespace(num_workers=2, start_time=0.0, workers=[])

    def poll(*checkpointed: int) -> WorkerGroupPollStatus:
        return WorkerGroupPollStatus({rank: WorkerStatus(running=True, training_report=_TrainingReport(
            Checkpoint("/ckpt") if rank in checkpointed else None, {}, False)) for rank in range(2)})

    assert isinstance(policy.make_decision_for_running_worker_group(group, poll()), NoopDecision)  # room: held
    assert isinstance(policy.make_decision_for_running_worker_group(group, poll(1)), NoopDecision)  # rank 0 uploads
    assert policy.make_decision_for_running_worker_group(group, poll(0)).num_workers == 3  # every rank's part is in

    # A node of the group drains: no shrinking here, the notice's checkpoint and restart come first.
    monkeypatch.setattr(scaling, "leaving_nodes", lambda: {"node-2"})
    running = SimpleNamespace(num_workers=3, start_time=0.0, workers=[])
    assert isinstance(policy.make_decision_for_running_worker_group(running, poll(0, 1)), NoopDecision)
