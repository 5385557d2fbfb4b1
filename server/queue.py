"""The server's queue: every job, sweep and pipeline submitted through the server waits here until the
cluster has room for it and its team is within its quota, then starts as a Ray job.

Order: priority class first (high, normal, low), first in first out within a class. A submission that
waits for room holds back every one after it (no backfill: a big job is never starved by small ones);
one that waits for its team's quota does not. Room is the alive nodes' resources and those of the nodes the
autoscaler may add, less what the queue itself started (each submission's workers, from its spec), not
Ray's free resources, which lag a start by seconds.

Rows are the truth: the queue's state survives a restart of the server, and a submission Ray already
knows (the server stopped between starting it and writing so) is re-attached, never started twice.

A submission the cluster failed, not its spec or code, is submitted again, up to MAX_ATTEMPTS in all,
after a backoff that doubles each time: its driver was killed (a signal) or lost (its node or the Ray
head died: Ray's supervisor error, or Ray no longer knows it), or it exited 75 (the cluster or a service
did not answer it). The retry is a new submission of the same spec, which resumes from the job's
checkpoints in the same MLflow run; it keeps its place in the queue.
"""

from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Column, Float, Integer, String, Table, Text, select, update

from server.users import User, metadata

if TYPE_CHECKING:  # at run time they load where used: the CLI reads PRIORITIES from here, and Ray is slow to load
    from infra.settings import Settings
    from jobs.submit import JobsClient, Plan, Queued, Submission

log = logging.getLogger(__name__)

PRIORITIES = {"high": 2, "normal": 1, "low": 0}
QUEUED, STARTED, ENDED, CANCELLED = "queued", "started", "ended", "cancelled"
MAX_ATTEMPTS = 4
GROUPS_READ_S = 60.0
RETRY_BACKOFF_S = 5.0  # before the first retry; doubled before each next one
RETRY_BACKOFF_MAX_S = 300.0
# Ray's errors for a driver whose supervisor (on the head or its node) died or never started.
LOST_DRIVER_ERRORS = {"JOB_SUPERVISOR_ACTOR_DIED", "JOB_SUPERVISOR_ACTOR_UNKNOWN_FAILURE",
                      "JOB_SUPERVISOR_ACTOR_START_FAILURE", "JOB_SUPERVISOR_ACTOR_START_TIMEOUT"}

QUEUE = Table(
    "compound_queue", metadata,
    Column("submission_id", String(200), primary_key=True),
    Column("client_key", String(300), unique=True),  # "<user>/<key>": the same key gives back the same submission
    Column("kind", String(20), nullable=False),
    Column("name", String(200), nullable=False, index=True),
    Column("user", String(63), nullable=False),
    Column("team", String(63), nullable=False, index=True),
    Column("priority", Integer, nullable=False),
    Column("state", String(20), nullable=False, index=True),
    Column("plan", Text, nullable=False),  # JSON: entrypoint, metadata, spec_uri, needs
    Column("enqueued", Float, nullable=False),
    Column("started", Float),
    Column("reason", Text),  # why it waits, or how it ended
    Column("attempt", Integer, nullable=False, default=1),
    Column("retry_of", String(200)),  # the submission this one submits again
    Column("not_before", Float),  # a retry's backoff: it starts no sooner
)
QUOTAS = Table(
    "compound_quotas", metadata,
    Column("team", String(63), primary_key=True),
    Column("jobs", Integer),  # None: no limit
    Column("cpus", Float),
    Column("gpus", Float),
)


@dataclass(frozen=True)
class Entry:
    submission_id: str
    kind: str
    name: str
    user: str
    team: str
    priority: int
    state: str
    enqueued: float
    needs: dict[str, float] = field(default_factory=dict)
    started: float | None = None
    reason: str | None = None
    attempt: int = 1
    retry_of: str | None = None
    not_before: float | None = None

    @property
    def priority_class(self) -> str:
        return next(name for name, rank in PRIORITIES.items() if rank == self.priority)


@dataclass(frozen=True)
class Quota:
    jobs: int | None = None
    cpus: float | None = None
    gpus: float | None = None


def order(waiting: list[Entry]) -> list[Entry]:
    return sorted(waiting, key=lambda e: (-e.priority, e.enqueued, e.submission_id))


def decide(waiting: list[Entry], running: list[Entry], capacity: dict[str, float],
           quotas: dict[str, Quota], now: float = 0.0) -> tuple[list[Entry], dict[str, str]]:
    """The waiting entries that start now, in order, and why each other one waits."""
    free = dict(capacity)
    teams: dict[str, list[Entry]] = {}
    for entry in running:
        _take(free, entry.needs)
        teams.setdefault(entry.team, []).append(entry)
    starting, why, held_back_by = [], {}, None
    for entry in order(waiting):
        over = _over_quota(entry, teams.get(entry.team, []), quotas.get(entry.team))
        if entry.not_before is not None and entry.not_before > now:  # like a quota, it holds back no one
            why[entry.submission_id] = (f"attempt {entry.attempt} (a retry of {entry.retry_of}) waits out its backoff: "
                                        f"{entry.not_before - now:.0f} s more")
        elif over:
            why[entry.submission_id] = over
        elif held_back_by is not None:
            why[entry.submission_id] = f"behind {held_back_by}, which waits for room and goes first"
        elif short := [name for name, amount in entry.needs.items() if amount > free.get(name, 0.0) + 1e-9]:
            why[entry.submission_id] = ("waits for room: needs " + _amounts(entry.needs, short) + "; free now "
                                        + _amounts(free, short))
            held_back_by = entry.submission_id
        else:
            starting.append(entry)
            _take(free, entry.needs)
            teams.setdefault(entry.team, []).append(entry)
    return starting, why


def _over_quota(entry: Entry, team_running: list[Entry], quota: Quota | None) -> str | None:
    if quota is None:
        return None
    if quota.jobs is not None and len(team_running) + 1 > quota.jobs:
        return f"team {entry.team} is at its quota of {quota.jobs} running submission(s)"
    for resource, limit in (("CPU", quota.cpus), ("GPU", quota.gpus)):
        held = sum(e.needs.get(resource, 0.0) for e in team_running)
        if limit is not None and held + entry.needs.get(resource, 0.0) > limit + 1e-9:
            return (f"team {entry.team} holds {held:g} of its quota of {limit:g} {resource}; this one needs "
                    f"{entry.needs.get(resource, 0.0):g} more")
    return None


def _take(free: dict[str, float], needs: dict[str, float]) -> None:
    for name, amount in needs.items():
        free[name] = free.get(name, 0.0) - amount


def _amounts(resources: dict[str, float], names: list[str]) -> str:
    return ", ".join(f"{resources.get(n, 0.0) / 2**30:g} GiB memory" if n == "memory" else
                     f"{max(resources.get(n, 0.0), 0.0):g} {n}" for n in names)


class Queue:
    """The queue on the server's database, for the cluster and S3 store the `settings` name (read anew
    each time: they may change under a running server)."""

    def __init__(self, engine, settings: Callable[[], Settings]) -> None:
        self.engine, self.settings = engine, settings
        self.lock = threading.Lock()  # one admission pass at a time
        self.planning = threading.Lock()  # one submission planned at a time: each takes the next id of its name
        self._groups: list[tuple[dict[str, float], int]] = []  # the autoscaler's node groups, as last read
        self._groups_read = -GROUPS_READ_S

    def client(self) -> JobsClient:
        from jobs.submit import JobsClient

        stack = self.settings()
        return JobsClient(stack.ray_dashboard_url, stack.ray_token)

    def by_key(self, user: User, key: str) -> Entry | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(QUEUE).where(QUEUE.c.client_key == f"{user.name}/{key}")).first()
        return _entry(row) if row else None

    def queued(self) -> list[Queued]:
        from jobs.submit import Queued

        return [Queued(e.submission_id, e.name) for e in self.entries(QUEUED)]

    def enqueue(self, plan: Callable[[list[Queued]], Plan], user: User, *, priority: str = "normal",
                key: str | None = None) -> Entry:
        """Plan a submission beside those queued, store its spec and queue it; with a `key` this user sent
        before, the submission made then. Planning raises what is wrong (`SpecError`, `SubmissionError`)."""
        from jobs.submit import store_spec

        with self.planning:
            if key is not None and (known := self.by_key(user, key)) is not None:
                return known
            made = plan(self.queued())
            store_spec(made, self.settings())
            return self._add(made, user, priority=priority, key=key)

    def _add(self, plan: Plan, user: User, *, priority: str, key: str | None) -> Entry:
        """Queue a planned submission (its spec already stored)."""
        from jobs.submit import JOB_KEY

        with self.engine.begin() as connection:
            connection.execute(QUEUE.insert().values(
                submission_id=plan.submission_id, client_key=f"{user.name}/{key}" if key else None, kind=plan.kind,
                name=plan.metadata[JOB_KEY], user=user.name, team=user.team, priority=PRIORITIES[priority],
                state=QUEUED, enqueued=time.time(), reason="just queued",
                plan=json.dumps({"entrypoint": plan.entrypoint, "metadata": plan.metadata, "spec_uri": plan.spec_uri,
                                 "needs": plan.needs})))
        return self.find(plan.submission_id)

    def find(self, submission_id: str) -> Entry | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(QUEUE).where(QUEUE.c.submission_id == submission_id)).first()
        return _entry(row) if row else None

    def entries(self, *states: str) -> list[Entry]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(QUEUE).where(QUEUE.c.state.in_(states)))
            return [_entry(row) for row in rows]

    def positions(self) -> dict[str, int]:
        """Each waiting submission's place in the queue: 1 starts next."""
        return {e.submission_id: place for place, e in enumerate(order(self.entries(QUEUED)), start=1)}

    def admit(self) -> list[Entry]:
        """One pass: note what ended, re-attach what Ray already runs, start what fits; the entries started."""
        with self.lock:
            client = self.client()
            known = {s.submission_id: s for s in client.submissions()}
            running = []
            for entry in self.entries(STARTED):
                submission = known.get(entry.submission_id)
                if submission is not None and submission.active:
                    running.append(entry)
                elif (lost := infrastructure_failure(submission)) and entry.attempt < MAX_ATTEMPTS:
                    self._retry(entry, lost, known)
                else:
                    self._set(entry, state=ENDED, reason=_ended(submission))
            waiting = []
            for entry in self.entries(QUEUED):
                if entry.submission_id in known:  # started before the server last stopped
                    self._set(entry, state=STARTED, started=time.time(), reason="re-attached")
                    running.append(entry)
                else:
                    waiting.append(entry)
            starting, why = decide(waiting, running, self._room(client), self.quotas(), time.time())
            started = []
            for entry in starting:
                try:
                    self._start(entry, client)
                except Exception as error:  # noqa: BLE001 - the cluster refused or is gone: it waits; the pass ends
                    self._set(entry, reason=f"could not start on the cluster: {str(error).splitlines()[0][:300]}")
                    break
                started.append(entry)
            for entry in waiting:  # written only when it changed: a long queue costs no writes a pass
                if entry.submission_id in why and why[entry.submission_id] != entry.reason:
                    self._set(entry, reason=why[entry.submission_id])
            return started

    def _room(self, client: JobsClient) -> dict[str, float]:
        """The cluster's resources: its alive nodes', and those its autoscaler may add (a submission that needs
        them starts, and waits in Ray while nodes come; with no limit to a group, room is not counted)."""
        from jobs.capacity import autoscaling_groups

        room: dict[str, float] = {}
        if time.monotonic() - self._groups_read > GROUPS_READ_S:  # a GCS read: not every pass
            self._groups, self._groups_read = autoscaling_groups(self.settings().ray_address), time.monotonic()
        nodes = client.capacity() + [resources for resources, most in self._groups for _ in range(max(most, 0))]
        for node in nodes:
            for name, amount in node.items():
                room[name] = room.get(name, 0.0) + amount
        if any(most < 0 for _, most in self._groups):
            room = {name: float("inf") for name in {*room, *(n for resources, _ in self._groups for n in resources)}}
        return room

    def nudge(self) -> None:
        """An admission pass now, not at the next tick; a cluster that is down leaves it to the tick."""
        try:
            self.admit()
        except Exception:
            log.exception("could not admit the queued submissions")

    def latest(self, ref: str) -> Entry | None:
        """The waiting or running entry with this submission id, or the latest of the job of this name."""
        entries = self.entries(QUEUED, STARTED)
        exact = [e for e in entries if e.submission_id == ref]
        return (exact or sorted((e for e in entries if e.name == ref), key=lambda e: e.enqueued) or [None])[-1]

    def stop(self, entry: Entry, *, by: str) -> Entry:
        """Take a waiting entry out of the queue (its stored spec removed), or stop a running one (its
        checkpoints kept); the entry as it ends."""
        with self.lock:  # not while a pass may be starting it
            entry = self.find(entry.submission_id)
            if entry.state == QUEUED:
                from jobs.submit import remove_spec

                remove_spec(self._plan(entry)["spec_uri"], self.settings())
                self._set(entry, state=CANCELLED, reason=f"taken out of the queue by {by}")
                return self.find(entry.submission_id)
        from jobs.submit import SubmissionError

        client = self.client()
        try:
            ended = client.stop(client.find(entry.submission_id)).status
        except SubmissionError:  # its head restarted before a pass saw it: nothing runs, nothing to retry
            ended = "gone from Ray"
        self._set(entry, state=ENDED, reason=f"{ended}: stopped by {by}")
        return self.find(entry.submission_id)

    def quotas(self) -> dict[str, Quota]:
        with self.engine.connect() as connection:
            return {row.team: Quota(jobs=row.jobs, cpus=row.cpus, gpus=row.gpus)
                    for row in connection.execute(select(QUOTAS))}

    def set_quota(self, team: str, quota: Quota) -> None:
        with self.engine.begin() as connection:
            connection.execute(QUOTAS.delete().where(QUOTAS.c.team == team))
            if quota != Quota():
                connection.execute(QUOTAS.insert().values(team=team, jobs=quota.jobs, cpus=quota.cpus, gpus=quota.gpus))

    def _start(self, entry: Entry, client: JobsClient) -> None:
        plan = self._plan(entry)
        client.ray.submit_job(entrypoint=plan["entrypoint"], submission_id=entry.submission_id,
                              metadata=plan["metadata"])
        self._set(entry, state=STARTED, started=time.time(), reason=None)
        log.info("started %s %s of team %s", entry.kind, entry.submission_id, entry.team)

    def _retry(self, entry: Entry, lost: str, known: dict[str, Submission]) -> None:
        """Queue the entry's spec again as a new submission, in the entry's place, after its backoff."""
        from jobs.submit import next_submission_id
        from server import audit

        retry_id = next_submission_id(entry.name, [*known, *(e.submission_id for e in self.named(entry.name))])
        plan = self._plan(entry)
        words = shlex.split(plan["entrypoint"])
        words[words.index("--submission-id") + 1] = retry_id
        plan["entrypoint"] = shlex.join(words)
        backoff = min(RETRY_BACKOFF_S * 2 ** (entry.attempt - 1), RETRY_BACKOFF_MAX_S)
        with self.engine.begin() as connection:
            connection.execute(QUEUE.insert().values(
                submission_id=retry_id, client_key=None, kind=entry.kind, name=entry.name, user=entry.user,
                team=entry.team, priority=entry.priority, state=QUEUED, enqueued=entry.enqueued, plan=json.dumps(plan),
                reason=f"a retry after: {lost}", attempt=entry.attempt + 1, retry_of=entry.submission_id,
                not_before=time.time() + backoff))
            connection.execute(update(QUEUE).where(QUEUE.c.submission_id == entry.submission_id).values(
                state=ENDED, reason=f"{lost}; submitted again as {retry_id}"))
        audit.record(self.engine, who="server", action="submission.retry", target=retry_id, outcome="ok",
                     detail=f"attempt {entry.attempt + 1} of {MAX_ATTEMPTS}, in {backoff:g} s: {entry.submission_id} "
                            f"{lost}")
        log.warning("%s %s: %s; submitting it again as %s in %g s", entry.kind, entry.submission_id, lost, retry_id,
                    backoff)

    def named(self, name: str) -> list[Entry]:
        """Every entry of a job, sweep or pipeline name, oldest first."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(QUEUE).where(QUEUE.c.name == name))
            return sorted((_entry(row) for row in rows), key=lambda e: (e.enqueued, e.attempt))

    def _plan(self, entry: Entry) -> dict:
        with self.engine.connect() as connection:
            return json.loads(connection.execute(select(QUEUE.c.plan).where(
                QUEUE.c.submission_id == entry.submission_id)).scalar_one())

    def _set(self, entry: Entry, **values) -> None:
        with self.engine.begin() as connection:
            connection.execute(update(QUEUE).where(QUEUE.c.submission_id == entry.submission_id).values(**values))


def infrastructure_failure(submission: Submission | None) -> str | None:
    """How the cluster, not the spec or the code, failed an ended submission; None if it did not."""
    from jobs.submit import INFRASTRUCTURE_EXIT

    if submission is None:
        return "Ray no longer knows it (its head restarted)"
    if submission.status != "FAILED":
        return None
    if submission.error_type in LOST_DRIVER_ERRORS:
        return f"its driver was lost ({submission.error_type})"
    if submission.exit_code is not None and (submission.exit_code < 0 or submission.exit_code > 128):
        return f"its driver was killed (exit code {submission.exit_code})"
    if submission.exit_code == INFRASTRUCTURE_EXIT:
        return f"the cluster or a service did not answer its driver (exit code {INFRASTRUCTURE_EXIT})"
    return None


def _ended(submission: Submission | None) -> str:
    if submission is None:
        return "the Ray job server no longer knows it"
    return f"{submission.status}: {submission.message}"[:1000]


def _entry(row) -> Entry:
    return Entry(submission_id=row.submission_id, kind=row.kind, name=row.name, user=row.user, team=row.team,
                 priority=row.priority, state=row.state, enqueued=row.enqueued, needs=json.loads(row.plan)["needs"],
                 started=row.started, reason=row.reason, attempt=row.attempt, retry_of=row.retry_of,
                 not_before=row.not_before)
