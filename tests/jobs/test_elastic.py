"""An elastic job on a cluster that changes under it: three one-CPU Ray nodes beside the stack's head, one
drained as a spot reclaim would, brought back, and another killed without notice; under DDP and under
DeepSpeed ZeRO-2, each against the curve of the same job on a fixed 3 workers."""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cluster.data.manifest import ShardManifest
from cluster.storage import S3Access
from infra.settings import Settings
from infra.stack import NODE_PREFIX, Stack
from tests.jobs.helpers import check_lineage, job_runs, make_spec, sample_log, split_keys, submit, wait_for

DRAIN_DEADLINE_S = 20
NODE_RESOURCE = "elastic-node"  # only the drill's nodes have it: the workers run there, not on the head


# Two micro-batches a step on 3 workers: 3 on 2 keep the global batch of 96 exactly.
JOB = {"model": {"resolution": 32}, "optim": {"epochs": 4, "grad_accumulation": 2}, "checkpoint": {"every_steps": 6},
       "data": {"batch_size": 16, "loader_workers": 0}}
# An elastic run's epochs against the fixed run's: the same samples each epoch, but not in the same micro-batches
# once the world size changed. Measured here (2026-12-07): train loss within 0.08 each epoch, the last epoch's
# validation top-1 within 0.03. The noise, the fixed run with seeds 0, 1 and 2: train loss apart by up to 0.11
# in an epoch, the last top-1 by 0.02, but the first epoch's top-1 by 0.14 (0.63, 0.77, 0.77: one epoch in,
# the model still climbs steeply), and a resize within it gave 0.80: an earlier epoch's top-1 is no measure.
LOSS_NOISE, TOP1_NOISE = 0.15, 0.1


@pytest.fixture(scope="module")
def fixed_size_curve(stack: Stack, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The drill's job on a fixed 3 workers of the same seed, on the head (half a CPU each: 3 fit its 2)."""
    spec_path, spec = make_spec(tmp_path_factory.mktemp("fixed"), **JOB,
                                scaling={"num_workers": 3, "cpus_per_worker": 0.5})
    job = submit(spec_path, stack, settings)
    assert job.wait(timeout_s=600) == "SUCCEEDED", job.logs()[-6000:]
    return _epoch_curve(settings, spec["name"])


# Four epochs and three restarts of the worker group on two busy cores: about 3 minutes here (DDP), more on a
# slower machine. ZeRO-2 takes the same path but for its checkpoint, resharded by DeepSpeed's universal checkpoint
# on a resize (tests/cluster/test_zero_resize.py checks the numbers).
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("strategy", [pytest.param({"name": "ddp"}, id="ddp"),
                                      pytest.param({"name": "deepspeed", "zero_stage": 2}, id="zero2")])
def test_an_elastic_job_checkpoints_on_a_drain_notice_shrinks_grows_and_survives_a_kill_training_each_sample_once(
        stack: Stack, settings: Settings, s3: S3Access, digits: ShardManifest, tmp_path: Path, strategy: dict,
        fixed_size_curve: dict) -> None:
    spec_path, spec = make_spec(
        tmp_path, **JOB, strategy=strategy,
        scaling={"num_workers": {"min": 2, "max": 3}, "cpus_per_worker": 1,
                 "resources_per_worker": {NODE_RESOURCE: 1}, "grow_check_s": 5})
    # The fourth replaces the third. New names for each drill: see Stack.add_node.
    nodes = [f"elastic-{uuid.uuid4().hex[:4]}-{i}" for i in range(4)]
    try:
        for node in nodes[:3]:
            stack.add_node(node, num_cpus=1, resources={NODE_RESOURCE: 1})
        job = submit(spec_path, stack, settings)
        # Ray's view of the cluster may not have the newest node yet: the job may start on 2 and grow to 3.
        wait_for(lambda: _group_of_three(sample_log(tmp_path)), "training on 3 workers", job, timeout_s=420)

        # A drain notice: the job checkpoints at once, trains on while the deadline leaves room, checkpoints as
        # late as it allows and waits; the restart on the 2 nodes left redoes at most the step under way.
        deadline = time.monotonic() + DRAIN_DEADLINE_S
        stack.drain_node(nodes[2], deadline_s=DRAIN_DEADLINE_S)
        wait_for(lambda: "checkpointing now" in job.logs(), "a checkpoint on the drain notice", job, timeout_s=60)
        first_group = {r["pid"] for r in sample_log(tmp_path)}
        time.sleep(max(0.0, deadline - time.monotonic()))
        stack.stop_service(NODE_PREFIX + nodes[2], grace_s=0)  # reclaimed at its deadline
        # Well within Ray Train's start-up limit (180 s here): the restart does not wait for a node that is gone.
        wait_for(lambda: "2 workers now, 3 before" in job.logs(), "the job on 2 workers", job, timeout_s=120)
        assert "global batch of 96 (the spec's 96)" in job.logs()
        wait_for(lambda: any(r["pid"] not in first_group for r in sample_log(tmp_path)), "steps on 2 workers", job)
        log = sample_log(tmp_path)
        last = max((r["epoch"], r["step"]) for r in log if r["pid"] in first_group)
        resumed = min((r["epoch"], r["step"]) for r in log if r["pid"] not in first_group)
        # ≤ 1 optimiser step lost
        assert last[0] == resumed[0] and last[1] - (resumed[1] - 1) <= 2, (last, resumed, job.logs()[-6000:])

        # A node in its place: the job grows to 3 again.
        before = {r["pid"] for r in sample_log(tmp_path)}
        stack.add_node(nodes[3], num_cpus=1, resources={NODE_RESOURCE: 1})
        wait_for(lambda: len([r for r in sample_log(tmp_path) if r["pid"] not in before and r["rank"] == 2]) >= 2,
                 "two steps on 3 workers again", job, timeout_s=420)
        assert "3 workers now, 2 before" in job.logs()

        # A node killed without notice: the job resumes from its last checkpoint on the 2 left, without waiting
        # for Ray to declare the node dead (the policy finds its raylet silent).
        stack.stop_service(NODE_PREFIX + nodes[1], grace_s=0)
        wait_for(lambda: job.logs().count("2 workers now, 3 before") >= 2, "the job on 2 workers again", job,
                 timeout_s=120)
        assert job.wait(timeout_s=900) == "SUCCEEDED", job.logs()[-6000:]
    finally:
        # The session's other tests count on the head alone, at once: a node stopped gracefully leaves Ray's
        # view of the cluster as it goes, one killed stays in it until its health checks fail (15 s).
        for node in stack.nodes():
            stack.stop_service(node)

    check_lineage(sample_log(tmp_path), split_keys(digits, s3), epochs=4)  # every sample once, each epoch
    assert "Source: preemption" in job.logs()  # counted apart from max_failures
    _check_goodput(settings, spec["name"], job.logs())

    # Training as if the cluster had never changed: the loss curve within noise of the fixed-size run's, and
    # the model it ends with as good.
    curve = _epoch_curve(settings, spec["name"])
    assert len(curve["train_loss"]) == 4 and all(
        abs(a - b) <= LOSS_NOISE for a, b in zip(curve["train_loss"], fixed_size_curve["train_loss"])), (
        curve, fixed_size_curve)
    assert abs(curve["val_top1"][-1] - fixed_size_curve["val_top1"][-1]) <= TOP1_NOISE, (curve, fixed_size_curve)
    assert curve["train_loss"][-1] < curve["train_loss"][0], curve  # and it learned


def _group_of_three(log: list[dict]) -> bool:
    """Whether a group of 3 workers has trained 2 steps, each of its ranks in the log: a group grown a moment
    ago has rank 2's lines before rank 0's (seen in CI), and the drill must know every pid of the drained group."""
    pids: dict[int, list[dict]] = {}
    for row in log:
        pids.setdefault(row["pid"], []).append(row)
    for rows in pids.values():
        if rows[0]["rank"] == 2 and len(rows) >= 2:
            start = (rows[0]["epoch"], rows[0]["step"])
            if {r[0]["rank"] for r in pids.values() if (r[0]["epoch"], r[0]["step"]) == start} == {0, 1, 2}:
                return True
    return False


def _epoch_curve(settings: Settings, job: str) -> dict[str, list[float]]:
    """The job's train loss and validation top-1, epoch by epoch, from its MLflow run."""
    client = MlflowClient(settings.mlflow_tracking_uri)
    (run,) = job_runs(client, job)
    return {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
            for key in ("train_loss", "val_top1")}


def _check_goodput(settings: Settings, job: str, logs: str) -> None:
    """MLflow shows the world size over the steps, the preemption, each restart and what it cost, and goodput."""
    client = MlflowClient(settings.mlflow_tracking_uri)
    (run,) = job_runs(client, job)

    def history(key: str) -> list[float]:  # in the order logged: a restart logs steps again
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)]

    sizes = [int(size) for size, _ in itertools.groupby(history("world_size"))]
    assert sizes in ([3, 2, 3, 2], [2, 3, 2, 3, 2]), sizes  # it may have started on 2 (above)
    assert max(history("preemptions")) == 1, [line for line in logs.splitlines() if "checkpointing now" in line]
    # One entry a restart; the count is the ledger's, which a restart takes from the checkpoint it resumes: a group
    # killed before its first checkpoint (the grown one may be) is not in it, its time is in the next one's loss.
    restarts, lost = history("restarts"), history("restart_lost_s")
    assert len(lost) == len(restarts) >= 3 and restarts[-1] >= 2 and all(0 < s < 600 for s in lost), (restarts, lost)
    goodput = history("goodput")[-1]
    assert 0.05 < goodput < 1, goodput
