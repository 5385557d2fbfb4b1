"""Training jobs as Ray jobs: `compound job submit|list|status|logs|stop`.

`submit` checks the spec as `job run` would (and that the cluster can ever hold the job's
workers), puts the spec next to the job's checkpoints on S3, and submits
`compound job run s3://…/submissions/<id>.yaml` through the Ray Jobs API. The cluster runs its own
installed compound: nothing of the user's machine is uploaded, and no credential travels — the
entrypoint, runtime_env and metadata name only the spec, and the cluster's processes take their
settings and S3 keys from the cluster's environment.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, SecretStr

from cluster.storage import lost_a_race, split_s3_url
from infra.settings import Settings
from jobs.capacity import autoscaling_groups, first_line, fits, job_needs, scaled
from jobs.driver import prepare_job
from jobs.model_source import pin_teacher
from jobs.s3 import s3_access
from jobs.spec import JobSpec, SweepSpec, dump_spec, load_job_spec, load_sweep_spec
from jobs.sweep import SWEEP_STORAGE_PREFIX, check_concurrency

log = logging.getLogger(__name__)

JOB_KEY = "compound.job"  # Ray job metadata: the job's name
EXPERIMENT_KEY = "compound.experiment"
SPEC_KEY = "compound.spec"
KIND_KEY = "compound.kind"  # "sweep" or "pipeline" for their drivers; absent for a job's
MAX_RUNTIME_KEY = "compound.max_runtime_s"  # the spec's max_runtime, which the compound server enforces
ACTIVE = ("PENDING", "RUNNING")
SUBMISSIONS_FOLDER = "submissions"
STOP_WAIT_S = 60.0
# A driver's exit status when the cluster or a service failed it, not its spec or code: the compound server
# submits such a driver again (EX_TEMPFAIL).
INFRASTRUCTURE_EXIT = 75


class SubmissionError(RuntimeError):
    """The job cannot be submitted, or a reference names no submission; the message says why."""


class AlreadyActive(SubmissionError):
    """A submission of the same name runs or waits in the server's queue."""


@dataclass(frozen=True)
class Submission:
    """One Ray job that runs a compound training job."""

    submission_id: str
    job: str
    status: str
    message: str
    start_time: float | None  # Unix seconds
    end_time: float | None
    experiment: str | None
    spec: str | None  # s3:// URI of the spec it runs
    max_runtime_s: float | None = None
    exit_code: int | None = None  # the driver's, once it ended
    error_type: str | None = None  # Ray's JobErrorType of a failed one

    @classmethod
    def from_details(cls, details) -> Submission:  # details: ray.job_submission.JobDetails
        metadata = details.metadata or {}
        return cls(
            submission_id=details.submission_id, job=metadata.get(JOB_KEY, "?"), status=str(details.status.value),
            message=details.message or "", start_time=details.start_time / 1000 if details.start_time else None,
            end_time=details.end_time / 1000 if details.end_time else None,
            experiment=metadata.get(EXPERIMENT_KEY), spec=metadata.get(SPEC_KEY),
            max_runtime_s=float(metadata[MAX_RUNTIME_KEY]) if metadata.get(MAX_RUNTIME_KEY) else None,
            exit_code=getattr(details, "driver_exit_code", None), error_type=getattr(details, "error_type", None),
        )

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclass(frozen=True)
class Plan:
    """What `submit` sends (or, with --dry-run, would send)."""

    spec: BaseModel  # a job, sweep or pipeline spec
    submission_id: str
    spec_uri: str
    entrypoint: str
    metadata: dict[str, str]
    kind: str = "job"  # job, sweep or pipeline
    resolved: JobSpec | None = None  # a job's spec resolved here: its teacher is pinned before submitting
    needs: dict[str, float] = field(default_factory=dict)  # what it holds while it runs, in Ray's resource names


@dataclass(frozen=True)
class Queued:
    """A submission a queue holds that Ray does not know yet: its name is taken, and its id."""

    submission_id: str
    name: str


MAX_NODES_LISTED = 10_000  # the most Ray's state API answers with; the dead nodes it remembers count too


class JobsClient:
    """The Ray Jobs API of one cluster, seen as compound jobs (Ray jobs with compound metadata)."""

    def __init__(self, address: str, token: SecretStr | None = None) -> None:
        """`token`: the cluster's, sent with every request (Ray reads its own auth settings only when it is
        first imported, which in a client may be before the settings are)."""
        from ray.job_submission import JobSubmissionClient

        self.address = address.rstrip("/")
        headers = {"Authorization": f"Bearer {token.get_secret_value()}"} if token is not None else None
        try:
            self.ray = JobSubmissionClient(self.address, headers=headers)
        except (ConnectionError, RuntimeError) as error:
            raise SubmissionError(f"cannot reach the Ray job server at {self.address} ({first_line(error)}): start "
                                  "the local stack with `compound up`, or pass --address / set "
                                  "COMPOUND_RAY_DASHBOARD_URL to your cluster's dashboard") from None

    def submissions(self) -> list[Submission]:
        """Every compound submission, oldest first."""
        found = [Submission.from_details(d) for d in self.ray.list_jobs() if JOB_KEY in (d.metadata or {})]
        return sorted(found, key=lambda s: s.start_time or 0)

    def find(self, ref: str) -> Submission:
        """A submission by id, or a job's latest submission by the job's name."""
        submissions = self.submissions()
        for submission in submissions:
            if submission.submission_id == ref:
                return submission
        of_job = [s for s in submissions if s.job == ref]
        if not of_job:
            raise SubmissionError(f"no submission or job named {ref!r} on {self.address}; `compound job list` "
                                  "shows what there is")
        return of_job[-1]

    def dashboard_url(self, submission_id: str) -> str:
        return f"{self.address}/#/jobs/{submission_id}"

    def logs(self, submission_id: str) -> str:
        return self.ray.get_job_logs(submission_id)

    def follow(self, submission_id: str, on_text: Callable[[str], None]) -> Submission:
        """Pass the job's log to `on_text` as it grows, until the job ends; the ended submission."""
        async def tail() -> None:
            async for text in self.ray.tail_job_logs(submission_id):
                on_text(text)

        asyncio.run(tail())
        return self._ended(submission_id)  # the log ends a moment before the status does

    def stop(self, submission: Submission) -> Submission:
        """Stop a running submission and wait until Ray reports it ended."""
        if not submission.active:
            return submission
        self.ray.stop_job(submission.submission_id)
        return self._ended(submission.submission_id)

    def _ended(self, submission_id: str) -> Submission:
        """The submission once Ray reports it ended (as it stands after STOP_WAIT_S if it has not)."""
        deadline = time.monotonic() + STOP_WAIT_S
        while (submission := self.find(submission_id)).active and time.monotonic() < deadline:
            time.sleep(0.5)
        return submission

    def capacity(self) -> list[dict[str, float]]:
        """The total resources of every alive node."""
        from ray.util.state import list_nodes

        # Every node, dead ones too, filtered here: with a state filter Ray compares the alive nodes it returns
        # with all it has ever had, and calls a cluster that lost a node a truncated answer (an exception).
        nodes = list_nodes(address=self.address, detail=True, limit=MAX_NODES_LISTED)
        return [dict(node.resources_total) for node in nodes if node.state == "ALIVE"]


def plan_submission(spec_path: Path, settings: Settings, client: JobsClient, *, gcs_address: str | None,
                    queued: Collection[Queued] = ()) -> Plan:
    """Check the spec, its data and storage, the cluster's room for it and its earlier submissions.
    `gcs_address`: where to read the cluster's autoscaling limits (None: count its alive nodes only)."""
    return plan_job(load_job_spec(spec_path), settings, client, gcs_address=gcs_address, source=str(spec_path),
                    queued=queued)


def plan_job(spec: JobSpec, settings: Settings, client: JobsClient, *, gcs_address: str | None, source: str,
             queued: Collection[Queued] = ()) -> Plan:
    resolved = prepare_job(spec, settings, source=source).spec
    groups = autoscaling_groups(gcs_address) if gcs_address else []
    room_problem = fits(resolved, client.capacity(), groups)
    if room_problem is not None:
        raise SubmissionError(f"job {spec.name} can never run on the cluster at {client.address}: {room_problem}")
    assert resolved.checkpoint.storage is not None
    # The spec as the user wrote it, every default spelled out: the cluster resolves it against its own settings.
    return plan_driver(spec, kind="job", name=spec.name, experiment=resolved.run_names[0], client=client,
                       folder=f"{resolved.checkpoint.storage.rstrip('/')}/{spec.name}", resolved=resolved,
                       needs=job_needs(resolved), queued=queued)


def plan_sweep_submission(spec_path: Path, settings: Settings, client: JobsClient) -> Plan:
    """Check the sweep spec, its base job's data and storage, the cluster's room for its trials and the
    sweep's earlier submissions; the sweep's driver (`compound sweep run`) runs as the Ray job."""
    return plan_sweep(load_sweep_spec(spec_path), settings, client, source=str(spec_path))


def plan_sweep(sweep: SweepSpec, settings: Settings, client: JobsClient, *, source: str,
               queued: Collection[Queued] = ()) -> Plan:
    base = prepare_job(sweep.base_job, settings, source=f"{source}: job").spec
    at_once = check_concurrency(sweep, base, client.capacity(), source)
    return plan_driver(sweep, kind="sweep", name=sweep.name, experiment=sweep.experiment, client=client,
                       folder=f"s3://{settings.checkpoints_bucket}/{SWEEP_STORAGE_PREFIX}/{sweep.name}",
                       needs=scaled(job_needs(base), at_once), queued=queued)


def plan_driver(spec: BaseModel, *, kind: str, name: str, experiment: str, client: JobsClient, folder: str,
                resolved: JobSpec | None = None, options: tuple[str, ...] = (), needs: dict[str, float] | None = None,
                queued: Collection[Queued] = ()) -> Plan:
    """A submission of `compound <kind> run` for the spec (stored under `folder`), refused while one of the
    same name is active or `queued`."""
    submissions = client.submissions()
    running = [s for s in submissions if s.job == name and s.active]
    if running:
        raise AlreadyActive(f"{kind} {name} is already {running[-1].status.lower()} as submission "
                            f"{running[-1].submission_id}; follow it with `compound job logs {name} --follow`, "
                            f"or stop it with `compound job stop {name}`")
    waiting = [q for q in queued if q.name == name]
    if waiting:
        raise AlreadyActive(f"{kind} {name} is already queued as submission {waiting[0].submission_id}; "
                            f"`compound queue` shows why it waits, `compound job stop {name}` takes it out")
    # The next number of the name: two submitters racing on "not active? then submit" pick the same id, and
    # only one can store its spec under it (an S3 conditional write) and submit it (Ray's ids are unique).
    submission_id = next_submission_id(name, [s.submission_id for s in submissions] + [q.submission_id for q in queued])
    spec_uri = f"{folder}/{SUBMISSIONS_FOLDER}/{submission_id}.yaml"
    entrypoint = shlex.join(["compound", kind, "run", spec_uri, "--submission-id", submission_id, *options])
    metadata = {JOB_KEY: name, EXPERIMENT_KEY: experiment, SPEC_KEY: spec_uri}
    if kind != "job":
        metadata[KIND_KEY] = kind
    if (limit := getattr(spec, "max_runtime", None)) is not None:
        metadata[MAX_RUNTIME_KEY] = f"{limit:g}"
    return Plan(spec=spec, kind=kind, submission_id=submission_id, spec_uri=spec_uri, entrypoint=entrypoint,
                metadata=metadata, resolved=resolved, needs=needs or {})


def next_submission_id(name: str, taken: Collection[str]) -> str:
    """`<name>-<n>`, n one past the highest of the name's submission ids in `taken`."""
    numbers = [int(match.group(1)) for i in taken if (match := re.fullmatch(rf"{re.escape(name)}-(\d+)", i))]
    return f"{name}-{max(numbers, default=0) + 1}"


def submit(plan: Plan, settings: Settings, client: JobsClient) -> None:
    """Put the spec on S3 and submit the job; the spec is removed again if Ray refuses it."""
    store_spec(plan, settings)
    try:
        client.ray.submit_job(entrypoint=plan.entrypoint, submission_id=plan.submission_id, metadata=plan.metadata)
    except BaseException:
        remove_spec(plan.spec_uri, settings)
        raise


def store_spec(plan: Plan, settings: Settings) -> None:
    """Put the spec where the submission's driver reads it (and a teacher on this machine where the cluster
    can read it); `SubmissionError` if another submitter stored one under the same id first."""
    from botocore.exceptions import ClientError

    bucket, key = split_s3_url(plan.spec_uri)
    if plan.resolved is not None and plan.resolved.distill is not None:
        # From here: the cluster's driver cannot read a teacher that is a file on this machine.
        pin_teacher(plan.resolved, s3=s3_access(settings), tracking_uri=settings.mlflow_tracking_uri)
    try:
        s3_access(settings).client().put_object(Bucket=bucket, Key=key, Body=dump_spec(plan.spec).encode(),
                                                ContentType="application/yaml", IfNoneMatch="*")
    except ClientError as error:
        if not lost_a_race(error):
            raise
        raise SubmissionError(f"{plan.submission_id} was submitted a moment ago by another submitter; follow it with "
                              f"`compound job logs {plan.submission_id} --follow`") from None


def remove_spec(spec_uri: str, settings: Settings) -> None:
    """A stored spec no submission will run (Ray refused it, or it was taken out of the queue)."""
    bucket, key = split_s3_url(spec_uri)
    s3_access(settings).client().delete_object(Bucket=bucket, Key=key)


def read_spec_text(spec_uri: str, settings: Settings) -> str:
    """A spec's YAML text at an s3:// URI (`SpecError` if it cannot be read): what a submitted driver runs."""
    from botocore.exceptions import BotoCoreError, ClientError

    from jobs.spec import SpecError

    bucket, key = split_s3_url(spec_uri)
    try:
        return s3_access(settings).client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except (ClientError, BotoCoreError, UnicodeDecodeError) as error:
        raise SpecError(spec_uri, [f"cannot read the spec: {error}"]) from None
