"""Scheduled retraining: a pipeline submitted on a cron schedule, or when a new dataset manifest appears
under an S3 prefix (the new manifest becomes the pipeline's data).

Built on APScheduler 3. A schedule is an APScheduler job in a SQL database of its own (SQLite in the
stack's home here, PostgreSQL at scale), stored as a JSON row (`schedule_store`), so schedules outlive
the scheduler process. Every job has
`coalesce=True` and no misfire limit: the runs missed while the scheduler was down collapse into one
catch-up run when it is back. `max_instances=1` keeps one firing of a schedule at a time, and a
firing submits nothing while a run of the pipeline is still active on the cluster: never two runs of
one pipeline at once. Every firing that submits or skips is recorded in a history table beside the
job store (`compound schedule history`).

The compound server (`compound up` starts it; `run_schedules`) runs the jobs; the CLI edits the same store, and the
server looks at it again every POLL_S seconds, so a schedule added from the CLI is due within that.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, TypeDecorator, create_engine, select

from infra.settings import Settings

if TYPE_CHECKING:
    from jobs.submit import JobsClient
    from pipelines.spec import PipelineSpec

log = logging.getLogger(__name__)

FIRE = "pipelines.scheduler:fire"  # what a schedule's APScheduler job calls (a textual reference: it is stored)
POLL_S = 5.0
SCHEDULE_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
MANIFEST_NAME = "manifest.json"


class UtcDateTime(TypeDecorator):
    """A moment stored as UTC and read back with its zone: SQLite keeps no zone, and a naive time in the API
    would be read in the reader's own."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime.datetime | None, dialect) -> datetime.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(f"a naive time ({value}) for a UTC column: give it its zone")
        return None if value is None else value.astimezone(datetime.UTC)

    def process_result_value(self, value: datetime.datetime | None, dialect) -> datetime.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=datetime.UTC) if value.tzinfo is None else value.astimezone(datetime.UTC)


_metadata = MetaData()
HISTORY = Table(
    "compound_schedule_history", _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("schedule", String(200), index=True, nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("action", String(20), nullable=False),  # submitted | skipped | failed | seen
    Column("data", String(1000)),  # the manifest the pipeline ran on
    Column("submission_id", String(200)),
    Column("detail", Text),
)


class ScheduleError(ValueError):
    """A schedule cannot be added or changed; the message says why."""


@dataclass(frozen=True)
class Schedule:
    name: str
    pipeline: str
    trigger: str  # as a person reads it
    next_run: datetime.datetime | None  # None: paused
    spec_uri: str
    data_prefix: str | None


def store_url(settings: Settings, home: Path | None) -> str:
    """The job store: the settings' `scheduler_store`, else SQLite in the stack's home."""
    from infra.settings import compound_home, default_scheduler_store

    return settings.scheduler_store or default_scheduler_store(home or compound_home())


def make_scheduler(url: str):
    """An APScheduler background scheduler on the store, with the job defaults every schedule keeps."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.schedulers.background import BackgroundScheduler

    from pipelines.schedule_store import JsonJobStore

    engine = engine_for(url)
    _metadata.create_all(engine)
    return BackgroundScheduler(
        jobstores={"default": JsonJobStore(engine)},
        executors={"default": ThreadPoolExecutor(max_workers=4)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone=datetime.UTC,
    )


@contextmanager
def editing(url: str) -> Iterator:
    """The store, opened to be edited by a process that runs no jobs (the CLI)."""
    scheduler = make_scheduler(url)
    scheduler.start(paused=True)
    try:
        yield scheduler
    finally:
        scheduler.shutdown(wait=False)


# --- the CLI's side -----------------------------------------------------------------------------------

def make_trigger(*, cron: str | None, data_prefix: str | None, poll_s: float = 60.0):
    """The trigger of a schedule: a cron expression (five fields, UTC), or a prefix looked at every `poll_s`
    seconds for a new manifest. `ScheduleError` says what is wrong with either."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    from cluster.storage import split_s3_url

    if (cron is None) == (data_prefix is None):
        raise ScheduleError("give either --cron or --on-new-data")
    if cron is not None:
        try:
            trigger = CronTrigger.from_crontab(_weekdays_named(cron), timezone=datetime.UTC)
        except ValueError as error:
            raise ScheduleError(f"--cron {cron!r}: {error}; five fields, e.g. '0 2 * * *' (02:00 UTC daily)") from None
        if trigger.get_next_fire_time(None, datetime.datetime.now(datetime.UTC)) is None:
            raise ScheduleError(f"--cron {cron!r} never fires: none of its months has its day (like February 30th "
                                "or April 31st)")
        return trigger
    try:
        bucket, _ = split_s3_url(data_prefix)
    except ValueError:
        bucket = ""
    if not bucket or not data_prefix.endswith("/"):
        raise ScheduleError(f"--on-new-data {data_prefix!r}: give an S3 prefix ending in /, a bucket and perhaps "
                            "folders, e.g. s3://shards/digits/")
    return IntervalTrigger(seconds=poll_s, timezone=datetime.UTC)


WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab's numbers: 0 (and 7) is Sunday


def _weekdays_named(cron: str) -> str:
    """The crontab with its day-of-week field as names: APScheduler 3 reads the numbers from Monday = 0, so
    crontab's `1-5` (Monday to Friday) would fire Tuesday to Saturday."""
    fields = cron.split()
    if len(fields) != 5 or fields[4] == "*":
        return cron
    days: set[int] = set()
    for item in fields[4].lower().split(","):
        span, _, step = item.partition("/")
        first, _, last = ("0-6" if span == "*" else span).partition("-")
        try:
            start, end = _weekday(first), _weekday(last or first)
            step_n = int(step) if step else 1
        except ValueError:
            return cron  # left as written: APScheduler's parser names what is wrong
        if end < start or step_n < 1:  # `5-1`, or `fri-mon`: not a span crontab accepts either
            raise ValueError(f"day of week {item!r} runs backwards; write it as a list, e.g. 5,6,0,1")
        days |= {day % 7 for day in range(start, end + 1, step_n)}
    return " ".join([*fields[:4], ",".join(WEEKDAYS[day] for day in sorted(days))])


def _weekday(text: str) -> int:
    if text in WEEKDAYS:
        return WEEKDAYS.index(text)
    day = int(text)
    if not 0 <= day <= 7:
        raise ValueError(text)
    return day


def add_schedule(url: str, trigger, *, name: str, pipeline: str, spec_uri: str, home: str | None,
                 data_prefix: str | None = None, settings: Settings | None = None, replace: bool = False) -> Schedule:
    """Add a schedule firing on `trigger` (see `make_trigger`). For a new-data schedule, the manifests
    already under the prefix are recorded as seen: only new ones trigger a run. `replace`: a schedule of
    the same name is replaced (its history stays)."""
    with editing(url) as scheduler:
        if scheduler.get_job(name) is not None and not replace:
            raise ScheduleError(f"a schedule named {name} exists; remove it first, pass --replace, or pass --name")
        if data_prefix is not None:
            assert settings is not None
            for manifest in manifests(settings, data_prefix):
                record(url, name, "seen", data=manifest, detail="there when the schedule was added")
        scheduler.add_job(FIRE, trigger, id=name, name=pipeline, replace_existing=replace,
                          kwargs={"schedule": name, "spec_uri": spec_uri, "data_prefix": data_prefix, "home": home,
                                  "store": url})
        return _schedule(scheduler.get_job(name))


def schedule_pipeline(url: str, spec: PipelineSpec, settings: Settings, *, cron: str | None, data_prefix: str | None,
                      poll_s: float = 60.0, name: str | None = None, replace: bool = False,
                      home: str | None = None) -> Schedule:
    """Schedule a pipeline (`compound schedule add`): its spec stored on S3 with the schedule, so later edits
    of its file change nothing until it is scheduled again. `ScheduleError` says what is wrong."""
    import re

    from cluster.storage import split_s3_url
    from jobs.s3 import s3_access
    from jobs.spec import dump_spec
    from pipelines.stages.base import PIPELINE_STORAGE_PREFIX

    trigger = make_trigger(cron=cron, data_prefix=data_prefix, poll_s=poll_s)
    name = name or spec.name
    if not re.match(SCHEDULE_NAME_PATTERN, name):
        raise ScheduleError(f"--name {name!r}: lowercase letters, digits and -, at most 63")
    if not replace and name in {s.name for s in list_schedules(url)}:
        raise ScheduleError(f"a schedule named {name} exists; remove it first, pass --replace, or pass --name")
    spec_uri = f"s3://{settings.checkpoints_bucket}/{PIPELINE_STORAGE_PREFIX}/{spec.name}/schedules/{name}.yaml"
    bucket, key = split_s3_url(spec_uri)
    store = s3_access(settings).client()
    store.put_object(Bucket=bucket, Key=key, Body=dump_spec(spec).encode(), ContentType="application/yaml")
    try:
        return add_schedule(url, trigger, name=name, pipeline=spec.name, spec_uri=spec_uri, home=home,
                            data_prefix=data_prefix, settings=settings, replace=replace)
    except BaseException:
        if not replace:  # a schedule it would have replaced reads the spec there
            store.delete_object(Bucket=bucket, Key=key)
        raise


def list_schedules(url: str) -> list[Schedule]:
    with editing(url) as scheduler:
        return [_schedule(job) for job in scheduler.get_jobs()]


def pause_schedule(url: str, name: str) -> Schedule:
    with editing(url) as scheduler:
        return _schedule(scheduler.pause_job(_known(scheduler, name).id))


def resume_schedule(url: str, name: str) -> Schedule:
    """Resume a paused schedule: its next run is the next time its trigger fires from now (the runs it
    missed while paused are not made up)."""
    with editing(url) as scheduler:
        return _schedule(scheduler.resume_job(_known(scheduler, name).id))


def remove_schedule(url: str, name: str) -> None:
    """Delete a schedule (its history stays)."""
    with editing(url) as scheduler:
        scheduler.remove_job(_known(scheduler, name).id)


def history(url: str, name: str | None = None, limit: int = 50) -> list[dict]:
    """The schedule's firings (every schedule's when None), newest first."""
    engine = engine_for(url)
    _metadata.create_all(engine)
    query = select(HISTORY).order_by(HISTORY.c.id.desc()).limit(limit)
    if name is not None:
        query = query.where(HISTORY.c.schedule == name)
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(query)]


def shown(schedule: Schedule) -> dict:
    """A schedule as JSON: its next run in ISO 8601 (None: paused)."""
    return jsonable(schedule.__dict__)


def jsonable(row: dict) -> dict:
    return {key: value.isoformat() if isinstance(value, datetime.datetime) else value for key, value in row.items()}


def _known(scheduler, name: str):
    job = scheduler.get_job(name)
    if job is None:
        names = ", ".join(j.id for j in scheduler.get_jobs()) or "none"
        raise ScheduleError(f"no schedule named {name}; schedules: {names}")
    return job


def _schedule(job) -> Schedule:
    kwargs = job.kwargs
    trigger = f"new manifest under {kwargs['data_prefix']} (checked every {job.trigger.interval.total_seconds():g} s)" \
        if kwargs["data_prefix"] else f"cron {_crontab(job.trigger)} (UTC)"
    return Schedule(name=job.id, pipeline=job.name, trigger=trigger, next_run=job.next_run_time,
                    spec_uri=kwargs["spec_uri"], data_prefix=kwargs["data_prefix"])


def _crontab(trigger) -> str:
    fields = {field.name: str(field) for field in trigger.fields}
    return " ".join(fields[name] for name in ("minute", "hour", "day", "month", "day_of_week"))


# --- the service's side -------------------------------------------------------------------------------

def fire(*, schedule: str, spec_uri: str, data_prefix: str | None, home: str | None, store: str) -> None:
    """One firing: submit the pipeline (on the newest unseen manifest, for a new-data schedule), unless a
    run of it is still active. Recorded in the history; a failure is recorded and logged, not raised."""
    from infra.settings import load_settings
    from jobs.submit import AlreadyActive, JobsClient, read_spec_text
    from pipelines.spec import load_pipeline_spec_text, with_data

    data = None
    try:
        settings = load_settings(Path(home) if home else None)
        spec = load_pipeline_spec_text(read_spec_text(spec_uri, settings), spec_uri)
        if data_prefix is not None:
            seen = {row["data"] for row in history(store, schedule, limit=10_000)}
            new = [manifest for manifest in manifests(settings, data_prefix) if manifest not in seen]
            if not new:
                return
            data = new[-1]  # the newest: the ones before it are superseded
            spec = with_data(spec, data, spec_uri)
        client = JobsClient(settings.ray_dashboard_url, settings.ray_token)
        try:
            submission_id = (_enqueue or _submit_now)(spec, settings, client)  # the spec stored has the new data
        except AlreadyActive as error:
            record(store, schedule, "skipped", data=data, detail=str(error))
            log.info("schedule %s: skipped, pipeline %s still running or queued", schedule, spec.name)
            return
        record(store, schedule, "submitted", data=data or spec.data, submission_id=submission_id)
        log.info("schedule %s: submitted pipeline %s as %s", schedule, spec.name, submission_id)
    except Exception as error:  # the scheduler goes on; the history says what went wrong
        log.exception("schedule %s failed", schedule)
        record(store, schedule, "failed", data=data, detail=str(error)[:2000])


def _submit_now(spec, settings: Settings, client) -> str:
    """A firing's pipeline straight to Ray (a scheduler with no queue beside it)."""
    from jobs.submit import submit
    from pipelines.submit import plan_pipeline_submission

    plan = plan_pipeline_submission(spec, settings, client)
    submit(plan, settings, client)
    return plan.submission_id


# Where firings go: `run_schedules` sets it to the compound server's queue (the scheduler runs in the server).
_enqueue: Callable[[PipelineSpec, Settings, JobsClient], str] | None = None


def manifests(settings: Settings, prefix: str) -> list[str]:
    """Every dataset manifest under the prefix, oldest first (by when it was written)."""
    from cluster.storage import split_s3_url

    bucket, key_prefix = split_s3_url(prefix)
    found = []
    paginator = settings.s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
        found += [(item["LastModified"], item["Key"]) for item in page.get("Contents", [])
                  if item["Key"].endswith(MANIFEST_NAME)]
    return [f"s3://{bucket}/{key}" for _, key in sorted(found)]


def record(url: str, schedule: str, action: str, *, data: str | None = None, submission_id: str | None = None,
           detail: str | None = None) -> None:
    with engine_for(url).begin() as connection:
        connection.execute(HISTORY.insert().values(schedule=schedule, at=datetime.datetime.now(datetime.UTC),
                                                   action=action, data=data, submission_id=submission_id,
                                                   detail=detail))


def engine_for(url: str):
    """An engine on the store; a SQLite file's folder is made first."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url)


def run_schedules(url: str, stop: threading.Event,
                  enqueue: Callable[[PipelineSpec, Settings, JobsClient], str] | None = None) -> None:
    """Run the schedules until `stop` is set (the compound server runs this beside its API); `enqueue`:
    where each firing's pipeline goes (its submission id back; `AlreadyActive` to skip), else straight to Ray."""
    global _enqueue
    _enqueue = enqueue
    scheduler = make_scheduler(url)
    scheduler.start()
    log.info("scheduler: %d schedule(s) in %s", len(scheduler.get_jobs()), url.split("@")[-1])
    try:
        while not stop.wait(POLL_S):
            scheduler.wakeup()  # schedules added or changed by the CLI since the last look
    finally:
        scheduler.shutdown(wait=True)
