"""The queue: submissions in (a job, sweep or pipeline spec), where each stands, stops, and the teams' quotas."""

import re
from typing import Literal

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field

from server.access import Admin, Context, ServerParts, Submitter, Viewer, audited
from server.queue import PRIORITIES, QUEUED, STARTED, Entry, Quota
from server.users import NAME_PATTERN

router = APIRouter()


class NewSubmission(BaseModel):
    kind: Literal["job", "sweep", "pipeline"]
    spec: str = Field(max_length=1_000_000, description="the spec's YAML, its job and sweep files read in")
    priority: Literal[tuple(PRIORITIES)] = "normal"
    key: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,200}$",
                            description="the same key from the same user gives back the same submission")
    from_stage: str | None = Field(default=None, max_length=100, description="a pipeline: run from this stage")


class SubmissionOut(BaseModel):
    submission_id: str
    kind: str
    name: str
    user: str
    team: str
    priority: str
    state: str  # queued | started | ended | cancelled
    position: int | None  # in the queue: 1 starts next
    reason: str | None  # why it waits, or how it ended
    enqueued: float  # Unix seconds
    started: float | None
    attempt: int  # 2 and on: a retry after the cluster failed the one before
    retry_of: str | None


class QuotaIn(BaseModel):
    jobs: int | None = Field(default=None, ge=0, description="running submissions at once; none: no limit")
    cpus: float | None = Field(default=None, ge=0)
    gpus: float | None = Field(default=None, ge=0)


def _shown(parts: ServerParts, entry: Entry, positions: dict[str, int] | None = None) -> SubmissionOut:
    positions = parts.queue.positions() if positions is None else positions
    return SubmissionOut(submission_id=entry.submission_id, kind=entry.kind, name=entry.name, user=entry.user,
                         team=entry.team, priority=entry.priority_class, state=entry.state,
                         position=positions.get(entry.submission_id), reason=entry.reason, enqueued=entry.enqueued,
                         started=entry.started, attempt=entry.attempt, retry_of=entry.retry_of)


@router.post("/api/submissions", name="submission.add", response_model=SubmissionOut, status_code=201)
def add_submission(new: NewSubmission, user: Submitter, parts: Context, response: Response) -> SubmissionOut:
    queue = parts.queue
    if new.key is not None and (known := queue.by_key(user, new.key)) is not None:
        response.status_code = 200  # the same submission again: nothing new is queued
        return _shown(parts, known)

    def add() -> Entry:
        from jobs.spec import SpecError
        from jobs.submit import SubmissionError
        from server.submissions import plan_text

        stack = parts.settings()
        try:
            entry = queue.enqueue(lambda queued: plan_text(new.kind, new.spec, stack, queue.client(),
                                                           from_stage=new.from_stage, queued=queued),
                                  user, priority=new.priority, key=new.key)
        except SpecError as error:
            raise HTTPException(422, str(error)) from None
        except SubmissionError as error:
            raise HTTPException(409, str(error)) from None
        queue.nudge()
        return queue.find(entry.submission_id)
    entry = audited(parts, user, "submission.add", f"{new.kind} ({new.priority})", add,
                    target_of=lambda made: f"{made.submission_id} ({made.priority_class})")
    return _shown(parts, entry)


@router.get("/api/queue", name="queue.list", response_model=list[SubmissionOut])
def list_queue(_: Viewer, parts: Context) -> list[SubmissionOut]:
    """What waits, in the order it will start, then what runs."""
    positions = parts.queue.positions()
    entries = [_shown(parts, e, positions) for e in parts.queue.entries(QUEUED, STARTED)]
    return sorted(entries, key=lambda e: (e.position is None, e.position or 0, e.enqueued))


@router.get("/api/submissions/{submission_id}", name="submission.show", response_model=SubmissionOut)
def show_submission(submission_id: str, _: Viewer, parts: Context) -> SubmissionOut:
    entry = parts.queue.find(submission_id)
    if entry is None:
        raise HTTPException(404, f"the server's queue has no submission {submission_id}")
    return _shown(parts, entry)


@router.post("/api/submissions/{ref}/stop", name="submission.stop", response_model=SubmissionOut)
def stop_submission(ref: str, user: Submitter, parts: Context) -> SubmissionOut:
    queue = parts.queue

    def stop() -> Entry:
        entry = queue.latest(ref)
        if entry is None:
            raise HTTPException(404, f"the server's queue has no submission or job named {ref!r} that waits or "
                                     "runs; `compound queue` shows them")
        if entry.team != user.team and not user.may("admin"):
            raise HTTPException(403, f"{entry.submission_id} is team {entry.team}'s; only they or an admin may "
                                     "stop it")
        return queue.stop(entry, by=user.name)
    ended = audited(parts, user, "submission.stop", ref, stop)
    queue.nudge()  # its room goes to the next in line now
    return _shown(parts, queue.find(ended.submission_id))


@router.get("/api/quotas", name="quota.list")
def list_quotas(_: Viewer, parts: Context) -> dict[str, QuotaIn]:
    return {team: QuotaIn(jobs=q.jobs, cpus=q.cpus, gpus=q.gpus) for team, q in parts.queue.quotas().items()}


@router.put("/api/quotas/{team}", name="quota.set", response_model=QuotaIn)
def set_quota(team: str, quota: QuotaIn, user: Admin, parts: Context) -> QuotaIn:
    if not re.fullmatch(NAME_PATTERN, team):
        raise HTTPException(422, f"team names are lower-case letters, digits, - and _; got {team!r}")
    audited(parts, user, "quota.set", team,
            lambda: parts.queue.set_quota(team, Quota(jobs=quota.jobs, cpus=quota.cpus, gpus=quota.gpus)))
    return quota
