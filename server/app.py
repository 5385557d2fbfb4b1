"""The server's HTTP API (FastAPI; the schema at /openapi.json). Every route but /health wants a bearer
token; each names the least role it needs. Refusals (401, 403) and every change are audited.
(No `from __future__ import annotations`: FastAPI reads the routes' annotations, local aliases included.)"""

import asyncio
import dataclasses
import datetime
import re
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from infra.settings import Settings
from server import audit, users
from server.queue import CANCELLED, PRIORITIES, QUEUED, STARTED, Entry, Queue, Quota
from server.users import NAME_PATTERN, ROLES, User

FOLLOW_POLL_S = 1.0


class NewUser(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="lower-case letters, digits, - and _")
    team: str = Field(pattern=NAME_PATTERN)
    role: str = Field(pattern="^(" + "|".join(ROLES) + ")$", description=" < ".join(ROLES))


class UserOut(BaseModel):
    name: str
    team: str
    role: str
    created: datetime.datetime
    revoked: datetime.datetime | None


class Credentials(BaseModel):
    """Shown once: the server keeps only the token's hash, MLflow only the password's."""

    name: str
    team: str
    role: str
    token: str
    mlflow_password: str


class Promotion(BaseModel):
    version: int = Field(ge=1)
    force: bool = False
    reason: str | None = Field(default=None, max_length=1000)


class Rollback(BaseModel):
    reason: str | None = Field(default=None, max_length=1000)


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


class NewSchedule(BaseModel):
    spec: str = Field(max_length=1_000_000, description="the pipeline spec's YAML, its job and sweep files read in")
    cron: str | None = Field(default=None, max_length=200, description="five fields, UTC")
    data_prefix: str | None = Field(default=None, max_length=1000, description="run on each new manifest here")
    poll_s: float = Field(default=60.0, ge=1)
    name: str | None = Field(default=None, max_length=63)
    replace: bool = False


class Decision(BaseModel):
    model: str
    version: int
    action: str
    champion: int | None
    previous: int | None
    reasons: list[str]


def make_app(engine, settings: Callable[[], Settings], queue: Queue, schedules: str) -> FastAPI:
    """The API on the server's database `engine`; `settings`: the stack's (MLflow, S3, the promoter);
    `schedules`: the schedules' store (a SQLAlchemy URL)."""
    app = FastAPI(title="compound server", version="1")
    bearer = HTTPBearer(auto_error=False)

    def caller(least: str):
        def check(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> User:
            action, target = request.scope["route"].name, request.url.path
            user = users.authenticate(engine, credentials.credentials) if credentials else None
            if user is None:
                audit.record(engine, who="anonymous", action=action, target=target, outcome="refused",
                             detail="no token" if credentials is None else "unknown or revoked token")
                raise HTTPException(401, "a valid bearer token is needed (`compound user add` makes one; the CLI "
                                         "sends the settings' server_token)", headers={"WWW-Authenticate": "Bearer"})
            if not user.may(least):
                audit.record(engine, who=user.name, action=action, target=target, outcome="denied",
                             detail=f"role {user.role}; needs {least}")
                raise HTTPException(403, f"{user.name} is a {user.role}: {action} needs the {least} role or above")
            return user
        return check

    # A route's caller, with the least role it needs.
    Viewer = Annotated[User, Depends(caller("viewer"))]
    Submitter = Annotated[User, Depends(caller("submitter"))]
    Promoter = Annotated[User, Depends(caller("promoter"))]
    Admin = Annotated[User, Depends(caller("admin"))]

    def done(user: User, action: str, target: str, work: Callable[[], object], *,
             target_of: Callable[[object], str] | None = None):
        """Run a change and audit it, however it ends; `target_of`: what it made, named from its result."""
        try:
            result = work()
        except Exception as error:
            detail = error.detail if isinstance(error, HTTPException) else str(error)
            denied = isinstance(error, HTTPException) and error.status_code == 403
            audit.record(engine, who=user.name, action=action, target=target, outcome="denied" if denied else "failed",
                         detail=detail)
            raise
        audit.record(engine, who=user.name, action=action, target=target_of(result) if target_of else target,
                     outcome="ok")
        return result

    @app.get("/health", include_in_schema=False)
    def health() -> str:
        return "OK"

    @app.get("/api/whoami", name="whoami", response_model=UserOut)
    def whoami(user: Viewer) -> User:
        return user

    @app.get("/api/users", name="user.list", response_model=list[UserOut])
    def list_users(_: Admin) -> list[User]:
        return users.list_users(engine)

    @app.post("/api/users", name="user.add", response_model=Credentials, status_code=201)
    def add_user(new: NewUser, user: Admin) -> Credentials:
        import requests
        from mlflow.exceptions import MlflowException

        from server.mlflow_logins import add_login

        def add() -> Credentials:
            try:
                token = users.add_user(engine, new.name, team=new.team, role=new.role)
            except users.UserError as error:
                raise HTTPException(409, str(error)) from None
            try:
                password = add_login(settings().mlflow_tracking_uri, new.name, new.role)
            except (MlflowException, requests.RequestException) as error:  # no half-made user
                users.remove(engine, new.name)
                raise HTTPException(502, f"MLflow refused {new.name}'s login: {error}") from None
            return Credentials(name=new.name, team=new.team, role=new.role, token=token, mlflow_password=password)
        return done(user, "user.add", new.name, add)

    @app.post("/api/users/{name}/revoke", name="user.revoke", response_model=UserOut)
    def revoke_user(name: str, user: Admin) -> User:
        from server.mlflow_logins import remove_login

        def revoke() -> User:
            try:
                users.revoke(engine, name)
            except users.UserError as error:
                raise HTTPException(404, str(error)) from None
            remove_login(settings().mlflow_tracking_uri, name)
            return users.find(engine, name)
        return done(user, "user.revoke", name, revoke)

    @app.get("/api/audit", name="audit.list")
    def audit_log(_: Admin, limit: int = 100) -> list[dict]:
        return audit.entries(engine, limit=max(1, min(limit, 10_000)))

    def shown(entry: Entry, positions: dict[str, int] | None = None) -> SubmissionOut:
        positions = queue.positions() if positions is None else positions
        return SubmissionOut(submission_id=entry.submission_id, kind=entry.kind, name=entry.name, user=entry.user,
                             team=entry.team, priority=entry.priority_class, state=entry.state,
                             position=positions.get(entry.submission_id), reason=entry.reason, enqueued=entry.enqueued,
                             started=entry.started, attempt=entry.attempt, retry_of=entry.retry_of)

    @app.post("/api/submissions", name="submission.add", response_model=SubmissionOut, status_code=201)
    def add_submission(new: NewSubmission, user: Submitter, response: Response) -> SubmissionOut:
        if new.key is not None and (known := queue.by_key(user, new.key)) is not None:
            response.status_code = 200  # the same submission again: nothing new is queued
            return shown(known)

        def add() -> Entry:
            from jobs.spec import SpecError
            from jobs.submit import SubmissionError
            from server.submissions import plan_text

            stack = settings()
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
        entry = done(user, "submission.add", f"{new.kind} ({new.priority})", add,
                     target_of=lambda made: f"{made.submission_id} ({made.priority_class})")
        return shown(entry)

    @app.get("/api/queue", name="queue.list", response_model=list[SubmissionOut])
    def list_queue(_: Viewer) -> list[SubmissionOut]:
        """What waits, in the order it will start, then what runs."""
        positions = queue.positions()
        entries = [shown(e, positions) for e in queue.entries(QUEUED, STARTED)]
        return sorted(entries, key=lambda e: (e.position is None, e.position or 0, e.enqueued))

    @app.get("/api/submissions/{submission_id}", name="submission.show", response_model=SubmissionOut)
    def show_submission(submission_id: str, _: Viewer) -> SubmissionOut:
        entry = queue.find(submission_id)
        if entry is None:
            raise HTTPException(404, f"the server's queue has no submission {submission_id}")
        return shown(entry)

    @app.post("/api/submissions/{ref}/stop", name="submission.stop", response_model=SubmissionOut)
    def stop_submission(ref: str, user: Submitter) -> SubmissionOut:
        def stop() -> Entry:
            entry = queue.latest(ref)
            if entry is None:
                raise HTTPException(404, f"the server's queue has no submission or job named {ref!r} that waits or "
                                         "runs; `compound queue` shows them")
            if entry.team != user.team and not user.may("admin"):
                raise HTTPException(403, f"{entry.submission_id} is team {entry.team}'s; only they or an admin may "
                                         "stop it")
            return queue.stop(entry, by=user.name)
        ended = done(user, "submission.stop", ref, stop)
        queue.nudge()  # its room goes to the next in line now
        return shown(queue.find(ended.submission_id))

    def cluster():
        from jobs.submit import SubmissionError

        try:
            return queue.client()
        except SubmissionError as error:
            raise HTTPException(503, str(error)) from None

    @app.get("/api/jobs", name="job.list")
    def list_jobs(_: Viewer) -> list[dict]:
        """Every compound submission Ray knows (jobs, sweeps, pipelines), then the queue's."""
        from server import job_views

        return [dataclasses.asdict(s) for s in job_views.submissions(cluster(), settings(), queue)]

    @app.get("/api/jobs/{ref}", name="job.status")
    def job_status(ref: str, _: Viewer) -> dict:
        """A submission by id, or a job's latest by name, with its Ray dashboard and MLflow run links."""
        from jobs.submit import SubmissionError
        from server import job_views

        client, stack = cluster(), settings()
        try:
            found = job_views.find(client, stack, ref, queue)
        except SubmissionError as error:
            raise HTTPException(404, str(error)) from None
        return {**dataclasses.asdict(found), **job_views.links(client, stack, found)}

    @app.get("/api/jobs/{ref}/logs", name="job.logs")
    def job_logs(ref: str, _: Viewer) -> dict:
        """Its driver's log (Ray's, or the copy kept on S3), a retried one's earlier attempts first."""
        from jobs.submit import SubmissionError
        from server import job_views

        try:
            try:
                client = queue.client()
            except SubmissionError:
                client = None  # the kept copies still answer
            return dataclasses.asdict(job_views.log(settings(), ref, client, queue))
        except SubmissionError as error:
            raise HTTPException(404, str(error)) from None

    def scheduling(work: Callable):
        from jobs.spec import SpecError
        from pipelines.scheduler import ScheduleError

        try:
            return work()
        except SpecError as error:
            raise HTTPException(422, str(error)) from None
        except ScheduleError as error:
            raise HTTPException(404 if str(error).startswith("no schedule") else 409, str(error)) from None

    @app.post("/api/schedules", name="schedule.add", status_code=201)
    def add_schedule(new: NewSchedule, user: Submitter) -> dict:
        from pipelines.scheduler import schedule_pipeline, shown
        from pipelines.spec import load_pipeline_spec_text

        def add() -> dict:
            spec = load_pipeline_spec_text(new.spec, "the submitted pipeline")
            return shown(schedule_pipeline(schedules, spec, settings(), cron=new.cron, data_prefix=new.data_prefix,
                                           poll_s=new.poll_s, name=new.name, replace=new.replace))
        return done(user, "schedule.add", new.name or "(the pipeline's name)", lambda: scheduling(add),
                    target_of=lambda added: added["name"])

    @app.get("/api/schedules", name="schedule.list")
    def list_schedules(_: Viewer) -> list[dict]:
        from pipelines.scheduler import list_schedules, shown

        return [shown(s) for s in list_schedules(schedules)]

    @app.get("/api/schedules/history", name="schedule.history")
    def schedule_history(_: Viewer, name: str | None = None, limit: int = 50) -> list[dict]:
        from pipelines.scheduler import history, jsonable

        return [jsonable(row) for row in history(schedules, name, max(1, min(limit, 10_000)))]

    @app.post("/api/schedules/{name}/pause", name="schedule.pause")
    def pause_schedule(name: str, user: Submitter) -> dict:
        from pipelines.scheduler import pause_schedule, shown

        return done(user, "schedule.pause", name, lambda: scheduling(lambda: shown(pause_schedule(schedules, name))))

    @app.post("/api/schedules/{name}/resume", name="schedule.resume")
    def resume_schedule(name: str, user: Submitter) -> dict:
        from pipelines.scheduler import resume_schedule, shown

        return done(user, "schedule.resume", name, lambda: scheduling(lambda: shown(resume_schedule(schedules, name))))

    @app.delete("/api/schedules/{name}", name="schedule.remove")
    def remove_schedule(name: str, user: Submitter) -> dict:
        from pipelines.scheduler import remove_schedule

        done(user, "schedule.remove", name, lambda: scheduling(lambda: remove_schedule(schedules, name)))
        return {"name": name, "removed": True}

    @app.get("/api/jobs/{ref}/logs/follow", name="job.follow")
    async def follow_logs(ref: str, _: Viewer) -> StreamingResponse:
        """Its driver's log as it grows, until it ends (one still queued: once it starts); then GET the job
        for how it ended."""
        from jobs.submit import SubmissionError
        from server import job_views

        client, stack = cluster(), settings()
        try:
            found = await asyncio.to_thread(job_views.find, client, stack, ref, queue)
        except SubmissionError as error:
            raise HTTPException(404, str(error)) from None

        async def text():
            while (entry := await asyncio.to_thread(queue.find, found.submission_id)) is not None \
                    and entry.state == QUEUED:
                await asyncio.sleep(FOLLOW_POLL_S)
            if entry is not None and entry.state == CANCELLED:
                return
            async for chunk in client.ray.tail_job_logs(found.submission_id):
                yield chunk
        return StreamingResponse(text(), media_type="text/plain", headers={"X-Submission-Id": found.submission_id})

    @app.get("/api/quotas", name="quota.list")
    def list_quotas(_: Viewer) -> dict[str, QuotaIn]:
        return {team: QuotaIn(jobs=q.jobs, cpus=q.cpus, gpus=q.gpus) for team, q in queue.quotas().items()}

    @app.put("/api/quotas/{team}", name="quota.set", response_model=QuotaIn)
    def set_quota(team: str, quota: QuotaIn, user: Admin) -> QuotaIn:
        if not re.fullmatch(NAME_PATTERN, team):
            raise HTTPException(422, f"team names are lower-case letters, digits, - and _; got {team!r}")
        done(user, "quota.set", team, lambda: queue.set_quota(team, Quota(jobs=quota.jobs, cpus=quota.cpus,
                                                                             gpus=quota.gpus)))
        return quota

    def registry_read(read: Callable):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            return read(MlflowClient(settings().mlflow_tracking_uri))
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise HTTPException(404, f"{str(error).splitlines()[0]}; `compound registry list` shows the "
                                         "registered models") from None
            raise HTTPException(502, f"the MLflow server failed: {str(error).splitlines()[0][:300]}") from None

    @app.get("/api/registry", name="registry.list")
    def list_models(_: Viewer) -> list[dict]:
        """Every registered model, its latest version and its aliases."""
        from pipelines.registry import models

        return registry_read(models)

    @app.get("/api/registry/{model}", name="registry.show")
    def show_model(model: str, _: Viewer) -> dict:
        """A model's versions (aliases, figures, lineage, decisions) and its champion history."""
        from pipelines.registry import model_view

        return registry_read(lambda client: model_view(client, model))

    @app.post("/api/registry/{model}/promote", name="registry.promote", response_model=Decision)
    def promote(model: str, asked: Promotion, user: Promoter) -> Decision:
        from pipelines.registry import promote as promote_version

        if asked.force and not asked.reason:
            raise HTTPException(422, "a forced promotion needs a reason: it is recorded with the decision")
        return done(user, "registry.promote", f"{model} v{asked.version}", lambda: _decision(_registry(
            lambda: promote_version(settings(), name=model, version=asked.version, force=asked.force,
                                    reason=_signed(asked.reason, user)))))

    @app.post("/api/registry/{model}/rollback", name="registry.rollback", response_model=Decision)
    def rollback(model: str, asked: Rollback, user: Promoter) -> Decision:
        from pipelines.registry import rollback as rollback_model

        return done(user, "registry.rollback", model, lambda: _decision(_registry(
            lambda: rollback_model(settings(), name=model, reason=_signed(asked.reason, user)))))

    return app


def _registry(operation):
    from pipelines.registry import RegistryError

    try:
        return operation()
    except RegistryError as error:
        raise HTTPException(409, str(error)) from None


def _signed(reason: str | None, user: User) -> str:
    """The reason recorded with a decision names who asked."""
    return f"{reason} (by {user.name})" if reason else f"by {user.name}"


def _decision(decision) -> Decision:
    return Decision(model=decision.model, version=decision.version, action=decision.action,
                    champion=decision.champion, previous=decision.previous, reasons=decision.reasons)
