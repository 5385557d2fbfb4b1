"""Suite-wide settings: deterministic CPU runs, GPU tests skipped where there is no CUDA device."""

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from cluster.data.manifest import ShardManifest
from cluster.data.sources import DigitsSource
from cluster.data.writer import write_shards
from cluster.storage import S3Access
from infra.settings import Settings, load_settings
from infra.stack import Stack, StackPorts
from jobs.s3 import s3_access


def pytest_configure(config: pytest.Config) -> None:
    # `make test` runs two of these processes beside the stacks' Ray workers on two cores: oversubscribed,
    # torch's intra-op threads would wait on each other: one each.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture(autouse=True)
def _jobs_a_failed_test_left_are_stopped(request: pytest.FixtureRequest) -> Iterator[None]:
    """A drill that fails midway leaves its job running on the session's stack, where it would hold the
    cluster and fail the tests after it too: one failure is reported once. Stopped through the server (its
    queue frees the room) and in Ray, and waited for: a stopped driver takes seconds to go."""
    yield
    if not request.node.stash.get(FAILED, False) or "stack" not in request.fixturenames:
        return
    from ray.job_submission import JobSubmissionClient

    from server.client import ServerClient, ServerError

    settings = request.getfixturevalue("settings")
    server, ray_jobs = ServerClient.of(settings), JobSubmissionClient(settings.ray_dashboard_url)

    def queued() -> list[dict]:
        try:
            return server.request("GET", "/api/queue")
        except ServerError as error:
            if error.status is not None:
                raise
            return []  # the test stopped the server: Ray's jobs are all there is to stop

    for entry in queued():
        try:
            server.request("POST", f"/api/submissions/{entry['submission_id']}/stop")
        except ServerError as error:
            if error.status != 404:  # 404: it ended meanwhile
                raise
    for job in ray_jobs.list_jobs():
        if job.submission_id and not job.status.is_terminal():
            ray_jobs.stop_job(job.submission_id)
    deadline = time.monotonic() + 120
    while queued() or any(job.submission_id and not job.status.is_terminal() for job in ray_jobs.list_jobs()):
        assert time.monotonic() < deadline, "the jobs a failed test left were stopped but still run after 120 s"
        time.sleep(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


LOGINS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(autouse=True)
def _logins_kept() -> Iterator[None]:
    """`load_settings` logs the process in through its environment: a test loading other settings must not
    leave their logins to the next test's subprocesses."""
    kept = {name: os.environ.get(name) for name in LOGINS}
    yield
    for name, value in kept.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def stack_home() -> Iterator[Path]:
    # Short on purpose: Ray puts unix sockets under it, and their paths are limited to 107 bytes.
    home = Path(tempfile.mkdtemp(prefix="cst", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(stack_home: Path) -> Iterator[Stack]:
    """The real local stack (SeaweedFS, MLflow, Ray) on free ports, shared by the whole session."""
    local = Stack(stack_home)
    # `make test`'s processes start their stacks together: each picks in a lane of its own.
    lane = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    local.up(StackPorts.free(lane, lanes=int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    yield local
    local.down(grace_s=0)  # the session's stack is thrown away: no Ray drain
    shutil.rmtree(local.ray_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def settings(stack: Stack) -> Settings:
    return load_settings(stack.home)


@pytest.fixture(scope="session")
def s3(settings: Settings) -> S3Access:
    """What workers receive: the stack's S3 store as an `S3Access`."""
    return s3_access(settings)


@pytest.fixture(scope="session")
def digits(s3: S3Access) -> ShardManifest:
    """The demo dataset where the example specs expect it: 64 px digits in 0.25 MB shards."""
    source = DigitsSource(image_size=64, val_fraction=0.2, seed=0)
    return write_shards(source, "s3://shards/digits/", s3=s3, shard_bytes=int(0.25 * 2**20), overwrite=True).manifest


@pytest.fixture(scope="session")
def model_run(settings: Settings) -> str:
    """A run with a logged (tiny) PyTorch model, for registry versions that need no training: what every
    version registered from it points at."""
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment("registry-test")
    with mlflow.start_run(experiment_id=experiment.experiment_id) as run:
        mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model", pip_requirements=["torch"],
                                 input_example=np.zeros((2, 2), dtype=np.float32))
    return run.info.run_id
