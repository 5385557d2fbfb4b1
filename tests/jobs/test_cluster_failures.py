"""Which training failures are the cluster's (the driver exits 75 and the compound server launches it again)
and which are the job's own (exit 1, not retried)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError
from ray.train.v2._internal.exceptions import (
    UserExceptionWithTraceback,
    WorkerGroupStartupTimeoutError,
    WorkerHealthCheckFailedError,
)

from compound.cli.common import driver_errors
from jobs.driver import ClusterFailedError, JobFailedError, cluster_failure
from pipelines.runner import StageFailedError


def _user_error() -> UserExceptionWithTraceback:
    return UserExceptionWithTraceback(ValueError("a bug in the training code"), "Traceback …")


def test_workers_whose_process_or_node_died_or_could_not_be_placed_are_the_clusters_failure() -> None:
    died = WorkerHealthCheckFailedError("worker 1 did not answer", ActorDiedError())
    assert "rank 1" in cluster_failure(WorkerGroupError("lost", {0: _user_error(), 1: died}))
    assert "could not start its workers" in cluster_failure(ControllerError(WorkerGroupStartupTimeoutError(2)))
    assert "lost its Ray Train controller" in cluster_failure(ActorDiedError())  # its head drained


def test_what_the_training_code_raised_is_the_jobs_own_failure() -> None:
    assert cluster_failure(WorkerGroupError("bug", {0: _user_error(), 1: _user_error()})) is None
    assert cluster_failure(ControllerError(RuntimeError("a callback failed"))) is None


def _driver(error: Exception):
    @click.command()
    @driver_errors
    def run() -> None:
        raise error
    return run


@pytest.mark.parametrize(("error", "code"), [
    (ClusterFailedError("job x stopped: the cluster lost its worker of rank 1"), 75),
    (JobFailedError("job x failed: a bug"), 1),
])
def test_a_driver_exits_75_for_the_clusters_failure_even_inside_a_pipeline_stage(error, code) -> None:
    assert CliRunner().invoke(_driver(error)).exit_code == code
    try:
        raise StageFailedError("pipeline p: stage train (train) failed") from error
    except StageFailedError as stage_failure:
        wrapped = stage_failure
    result = CliRunner().invoke(_driver(wrapped))
    assert result.exit_code == code and "stage train (train) failed" in result.output, result.output
