"""The driver of a training job: `compound job run SPEC`, and the entrypoint a Ray job runs.

Reads and resolves the spec (nothing starts if it is wrong), connects to the configured Ray
cluster, and runs the job's `TorchTrainer` to the end. Launched again after its driver died, the
same job resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cluster.storage import S3Access, split_s3_url
from cluster.tracking import RunRef
from cluster.train.checkpoint import PROGRESS_FILE, latest_checkpoint, remove_unregistered
from cluster.train.trainer import make_trainer
from infra.settings import RAY_CLIENT_ENV, Settings
from jobs.lease import LEASE_FILE, driver, held
from jobs.model_source import pin_teacher
from jobs.resolve import Launch, ResolvedJob, check_relaunch, record_launch, resolve_job
from jobs.s3 import s3_access
from jobs.spec import JobSpec
from jobs.tracking import TrackingUnavailableError, finish_run, log_final_model, open_run

log = logging.getLogger(__name__)

DEFAULT_STORAGE_PREFIX = "jobs"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
RAY_PROBE_TIMEOUT_S = 5.0


class JobFailedError(RuntimeError):
    """Training failed more often than the spec's failure.max_failures allows."""


class ClusterUnreachableError(ConnectionError):
    """The configured Ray cluster does not answer; the message says where and what to do."""


class ClusterFailedError(JobFailedError):
    """The cluster, not the job, ended training: its workers' nodes went, or it could not place them again."""


@dataclass(frozen=True)
class JobOutcome:
    spec: JobSpec
    history: list[dict]  # each epoch's metrics, from the final checkpoint
    checkpoint: str | None  # s3:// URI of the latest checkpoint
    resumed: bool
    run: RunRef  # the job's MLflow run


def prepare_job(spec: JobSpec, settings: Settings, *, source: str) -> ResolvedJob:
    """The spec resolved against its data and storage (`SpecError` if anything is wrong)."""
    default_storage = f"s3://{settings.checkpoints_bucket}/{DEFAULT_STORAGE_PREFIX}"
    return resolve_job(spec, s3=s3_access(settings), default_storage=default_storage, source=source,
                       tracking_uri=settings.mlflow_tracking_uri)


def run_job(spec: JobSpec, settings: Settings, *, source: str, submission_id: str | None = None) -> JobOutcome:
    """Resolve the spec, then train on the configured Ray cluster until the job ends, tracked in the
    job's one MLflow run."""
    job = prepare_job(spec, settings, source=source)
    assert job.spec.checkpoint.storage is not None
    # One driver per job: two would share its checkpoints, and one could remove the other's as unregistered.
    with held(s3_access(settings), f"{job.spec.checkpoint.storage.rstrip('/')}/{spec.name}/{LEASE_FILE}",
              what=f"job {spec.name}", holder=driver(submission_id, "compound job run")):
        # Before anything is recorded: an unreachable cluster or MLflow server leaves no trace.
        connected_here = connect_ray(settings)
        import ray

        try:
            trained = train_job(job, s3=s3_access(settings), tracking_uri=settings.mlflow_tracking_uri,
                                source=source, submission_id=submission_id)
        finally:
            if connected_here:
                ray.shutdown()  # also flushes the workers' forwarded output before ours
        return finish_job(trained, s3=s3_access(settings))


@dataclass(frozen=True)
class TrainedJob:
    """A job whose trainer has returned: what `finish_job` records."""

    job: ResolvedJob
    launch: Launch
    run: RunRef
    result: Any  # ray.train.Result


def train_job(job: ResolvedJob, *, s3: S3Access, tracking_uri: str, source: str, submission_id: str | None = None,
              callbacks: Sequence = (), in_sweep: bool = False) -> TrainedJob:
    """Train a resolved job on the Ray cluster this process is connected to, in its one MLflow run:
    what a job's driver and a sweep's trial (`in_sweep`) both do. `callbacks`: Ray Train callbacks (a sweep's
    report to Tune)."""
    from ray.train import TrainingFailedError

    spec = job.spec
    launch = check_relaunch(job, s3=s3, source=source)
    run = open_run(job, tracking_uri=tracking_uri, recorded_run_id=launch.run_id, submission_id=submission_id)
    record_launch(job, launch, s3=s3, run_id=run.run_id)
    if launch.resumes:
        log.info("job %s was launched before: resuming from its latest checkpoint", spec.name)
    log.info("MLflow run: %s", run.url)
    if spec.distill is not None:
        log.info("teacher pinned at %s", pin_teacher(spec, s3=s3, tracking_uri=tracking_uri))
    trainer = make_trainer(spec, s3=s3.without_keys(), storage=spec.checkpoint.storage,
                           spec_json=spec.model_dump_json(), dataset_ids=job.dataset_ids, run=run,
                           tracking=spec.tracking, callbacks=callbacks, sigterm_notice=not in_sweep)
    try:
        result = trainer.fit()
    except Exception as error:
        cause = cluster_failure(error)
        if cause is None and not isinstance(error, TrainingFailedError):
            raise
        finish_run(run, status="FAILED", required=False)
        if cause is not None:
            raise ClusterFailedError(f"job {spec.name} stopped: {cause}; it resumes from its latest checkpoint "
                                     f"when launched again\n{error}") from error
        raise JobFailedError(f"job {spec.name} failed: {error}") from error
    return TrainedJob(job=job, launch=launch, run=run, result=result)


def cluster_failure(error: BaseException) -> str | None:
    """How the cluster ended training (`error`: what `trainer.fit` raised), or None if the job's own code or
    spec did. Ray Train reports a worker whose process or node died as a failed health check, and one it
    could not place again as a failed or timed-out start; its controller lost (a drained head) surfaces
    as Ray's own error. Anything a worker raised is the job's."""
    from ray.exceptions import NodeDiedError, RayActorError, RaySystemError, WorkerCrashedError
    from ray.train import ControllerError, PreemptionError, WorkerGroupError
    from ray.train.v2._internal.exceptions import (
        WorkerGroupStartupFailedError,
        WorkerGroupStartupTimeoutError,
        WorkerHealthCheckFailedError,
        WorkerHealthCheckTimeoutError,
    )

    if isinstance(error, PreemptionError):
        return "a node it ran on was preempted"
    if isinstance(error, (RayActorError, NodeDiedError, RaySystemError, WorkerCrashedError)):
        return f"the cluster lost its Ray Train controller ({type(error).__name__})"
    if isinstance(error, ControllerError) and isinstance(
            error.controller_failure, (WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError)):
        return "the cluster could not start its workers again"
    if isinstance(error, WorkerGroupError):
        lost = [rank for rank, failure in error.worker_failures.items()
                if isinstance(failure, (WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError, RayActorError))]
        if lost:
            return f"the cluster lost its worker{'s' if len(lost) > 1 else ''} of rank {', '.join(map(str, lost))}"
    return None


def finish_job(trained: TrainedJob, *, s3: S3Access, log_model: bool = True) -> JobOutcome:
    """After training: clear checkpoints Ray never registered, log the model, mark the run finished."""
    from mlflow.exceptions import MlflowException

    spec, run, result = trained.job.spec, trained.run, trained.result
    filesystem = s3.filesystem()
    final = latest_checkpoint(filesystem, result.path, result.checkpoint.path if result.checkpoint else None)
    registered = [c.path for c, _ in result.best_checkpoints or []]
    removed = remove_unregistered(filesystem, result.path, [*registered, final] if final else registered)
    if removed:
        log.info("removed checkpoints Ray never registered: %s", ", ".join(removed))
    history, checkpoint = [], None
    try:
        if final is not None:
            checkpoint = f"s3://{final}"
            history = read_history(checkpoint, s3)
            if log_model:
                log_final_model(run, spec, checkpoint=checkpoint, history=history, s3=s3)
        finish_run(run, status="FINISHED")
    except MlflowException as error:
        raise TrackingUnavailableError(
            f"job {spec.name} trained to the end (checkpoint {checkpoint}), but the MLflow server at "
            f"{run.tracking_uri} failed while the model was logged ({str(error).splitlines()[0][:200]}); launch "
            "the job again once it answers: it resumes at its end and logs the model") from None
    return JobOutcome(spec=spec, history=history, checkpoint=checkpoint, resumed=trained.launch.resumes, run=run)


def read_history(checkpoint: str, s3: S3Access) -> list[dict]:
    """Every finished epoch's metrics, as the checkpoint at `checkpoint` (s3://…) records them."""
    bucket, key = split_s3_url(f"{checkpoint.rstrip('/')}/{PROGRESS_FILE}")
    return json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())["history"]


def connect_ray(settings: Settings) -> bool:
    """Join the configured Ray cluster as a driver; False if this process already had joined one.

    For the local stack's head (on loopback) Ray must be told so: otherwise it rewrites 127.0.0.1
    to the host's own address and waits there forever.
    """
    host, port = settings.ray_address.rsplit(":", 1)
    try:  # Ray itself would wait for an absent head for minutes, logging a warning every few seconds
        socket.create_connection((host, int(port)), timeout=RAY_PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as error:
        raise ClusterUnreachableError(
            f"cannot reach the Ray cluster at {settings.ray_address} ({error}): start the local stack with "
            "`compound up`, or point COMPOUND_RAY_ADDRESS at your cluster's head (host:port)") from None
    if host in LOOPBACK_HOSTS:
        os.environ.update(RAY_CLIENT_ENV)
        from ray._private import ray_constants

        # Ray reads the variable when first imported; this process may have imported it already.
        ray_constants.ENABLE_RAY_CLUSTER = False
    import ray

    if ray.is_initialized():
        return False
    # The job's own actors (Ray's too) find the cluster by RAY_ADDRESS, not by guessing among heads.
    ray.init(address=settings.ray_address, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"RAY_ADDRESS": settings.ray_address}})
    return True
