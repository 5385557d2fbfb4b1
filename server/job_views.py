"""What `compound job list|status|logs` show: Ray's compound submissions (those stopped for running past
their max_runtime as TIMED_OUT), the queue's waiting ones as QUEUED, and a submission's log, read from its
copy on S3 when Ray has forgotten it, with every earlier attempt of a retried one first. The server's
routes answer with these; the CLI uses them itself for a cluster it reaches directly (`--address`: no
queue then)."""

from __future__ import annotations

from dataclasses import dataclass

from infra.settings import Settings
from jobs.s3 import s3_access
from jobs.submit import JobsClient, Submission, SubmissionError
from server.queue import QUEUED, Queue


@dataclass(frozen=True)
class Log:
    submission_id: str
    text: str
    note: str | None = None  # where it came from, when not from Ray


def submissions(client: JobsClient, settings: Settings, queue: Queue | None = None) -> list[Submission]:
    """Every compound submission Ray knows, oldest first, then the queue's, in the order they will start."""
    from jobs.timeouts import with_timeouts

    return with_timeouts(client.submissions(), s3_access(settings), settings.checkpoints_bucket) + waiting(queue)


def find(client: JobsClient, settings: Settings, ref: str, queue: Queue | None = None) -> Submission:
    """A submission by id, or a job's latest by its name; one that waits in the queue if Ray has none."""
    from jobs.timeouts import with_timeouts

    try:
        (found,) = with_timeouts([client.find(ref)], s3_access(settings), settings.checkpoints_bucket)
        return found
    except SubmissionError:
        queued = [s for s in waiting(queue) if ref in (s.submission_id, s.job)]
        if not queued:
            raise
        return queued[-1]


def links(client: JobsClient, settings: Settings, submission: Submission) -> dict[str, str | None]:
    """The submission's Ray dashboard page, and its job's MLflow run (None until its driver opened it)."""
    from jobs.tracking import find_run

    run = find_run(settings.mlflow_tracking_uri, experiment=submission.experiment or submission.job,
                   job_name=submission.job)
    return {"dashboard": client.dashboard_url(submission.submission_id), "mlflow_run": run.url if run else None}


def waiting(queue: Queue | None) -> list[Submission]:
    if queue is None:
        return []
    positions = queue.positions()
    entries = sorted(queue.entries(QUEUED), key=lambda e: positions[e.submission_id])
    return [Submission(submission_id=e.submission_id, job=e.name, status="QUEUED", start_time=None, end_time=None,
                       message=f"#{positions[e.submission_id]} in the queue: {e.reason}", experiment=None, spec=None)
            for e in entries]


def log(settings: Settings, ref: str, client: JobsClient | None, queue: Queue | None = None) -> Log:
    """A submission's log, by id or job name: Ray's, or the copy kept on S3 when Ray no longer knows it (or
    `client` is None: Ray cannot be reached); a retried one's earlier attempts first."""
    from jobs.driver_log import read_kept

    s3, bucket = s3_access(settings), settings.checkpoints_bucket
    try:
        if client is None:
            raise SubmissionError("the Ray job server cannot be reached")
        found = client.find(ref)
        current = Log(found.submission_id, client.logs(found.submission_id))
    except SubmissionError as error:
        kept = read_kept(s3, bucket, ref)
        if kept is None:
            raise
        current = Log(kept[0], kept[1], note=f"{error.args[0].split(';')[0]}: the log of {kept[0]} kept on S3")
    earlier = attempts_before(queue, current.submission_id)
    if not earlier:
        return current
    parts = []
    for entry in earlier:
        kept = read_kept(s3, bucket, entry.submission_id)
        parts.append(f"--- attempt {entry.attempt}: {entry.submission_id} ({entry.reason}) ---\n"
                     f"{kept[1] if kept else '(no log kept)'}")
    parts.append(f"--- attempt {len(earlier) + 1}: {current.submission_id} ---\n{current.text}")
    return Log(current.submission_id, "".join(p if p.endswith("\n") else p + "\n" for p in parts), current.note)


def attempts_before(queue: Queue | None, submission_id: str) -> list:
    """The entries a retried submission stands in for, first first."""
    chain = []
    entry = queue.find(submission_id) if queue is not None else None
    while entry is not None and entry.retry_of is not None:
        entry = queue.find(entry.retry_of)
        if entry is not None:
            chain.insert(0, entry)
    return chain
