"""Where schedules live: APScheduler's SQLAlchemy job store with each schedule a JSON row, not a pickle.

APScheduler's own store pickles every job, and the scheduler unpickles whatever the table holds: a
write to the database would be code run by the scheduler. Here a row is plain data (the trigger as a
crontab or an interval, the pipeline's spec URI and the rest as strings) that anyone can read with
SQL, and reading it back builds only the two triggers compound makes.
"""

from __future__ import annotations

import datetime
import json
import logging

from apscheduler.job import Job
from apscheduler.jobstores.base import ConflictingIdError, JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from apscheduler.util import datetime_to_utc_timestamp
from sqlalchemy import Column, Float, MetaData, Table, Text, Unicode, inspect, select
from sqlalchemy.exc import IntegrityError

log = logging.getLogger(__name__)

TABLE = "compound_schedule_rows"
PICKLED_TABLE = "compound_schedules"  # the pickles of earlier versions: never read, only named


class JsonJobStore(SQLAlchemyJobStore):
    """SQLAlchemyJobStore whose `job_state` column is JSON text."""

    def __init__(self, engine) -> None:
        super().__init__(engine=engine, tablename=TABLE)
        self.jobs_t = Table(TABLE, MetaData(), Column("id", Unicode(191), primary_key=True),
                            Column("next_run_time", Float(25), index=True),
                            Column("job_state", Text, nullable=False))

    def start(self, scheduler, alias) -> None:
        super().start(scheduler, alias)
        _warn_of_pickles(self.engine)

    # The base class's two writers, with `encode` where they call `pickle.dumps`.
    def add_job(self, job: Job) -> None:
        row = {"id": job.id, "next_run_time": datetime_to_utc_timestamp(job.next_run_time),
               "job_state": encode(job.__getstate__())}
        with self.engine.begin() as connection:
            try:
                connection.execute(self.jobs_t.insert().values(**row))
            except IntegrityError:
                raise ConflictingIdError(job.id) from None

    def update_job(self, job: Job) -> None:
        update = self.jobs_t.update().values(
            next_run_time=datetime_to_utc_timestamp(job.next_run_time), job_state=encode(job.__getstate__()),
        ).where(self.jobs_t.c.id == job.id)
        with self.engine.begin() as connection:
            if connection.execute(update).rowcount == 0:
                raise JobLookupError(job.id)

    def _reconstitute_job(self, job_state) -> Job:
        state = decode(job_state)
        state["jobstore"] = self
        job = Job.__new__(Job)
        job.__setstate__(state)
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        return job


def encode(state: dict) -> str:
    """A job's state (`Job.__getstate__()`) as JSON; only the triggers compound makes are allowed."""
    trigger = state["trigger"]
    if isinstance(trigger, CronTrigger):
        fields = {field.name: str(field) for field in trigger.fields}
        as_data = {"cron": " ".join(fields[name] for name in ("minute", "hour", "day", "month", "day_of_week"))}
    elif isinstance(trigger, IntervalTrigger):
        as_data = {"every_s": trigger.interval.total_seconds(), "start": trigger.start_date.isoformat()}
    else:
        raise TypeError(f"a schedule's trigger is a cron or an interval, not {type(trigger).__name__}")
    return json.dumps({**state, "trigger": as_data, "args": list(state["args"]),
                       "next_run_time": state["next_run_time"].isoformat() if state["next_run_time"] else None})


def decode(text: str | bytes) -> dict:
    state = json.loads(text)
    trigger = state["trigger"]
    if "cron" in trigger:
        state["trigger"] = CronTrigger.from_crontab(trigger["cron"], timezone=datetime.UTC)
    else:
        state["trigger"] = IntervalTrigger(seconds=trigger["every_s"], timezone=datetime.UTC,
                                           start_date=datetime.datetime.fromisoformat(trigger["start"]))
    state["args"] = tuple(state["args"])
    if state["next_run_time"]:
        state["next_run_time"] = datetime.datetime.fromisoformat(state["next_run_time"])
    return state


def _warn_of_pickles(engine) -> None:
    """Schedules an earlier compound stored as pickles are not unpickled (that is the point); name them."""
    if not inspect(engine).has_table(PICKLED_TABLE):
        return
    old = Table(PICKLED_TABLE, MetaData(), autoload_with=engine)
    with engine.connect() as connection:
        names = [row.id for row in connection.execute(select(old.c.id))]
    if names:
        log.warning("schedules stored as pickles by an earlier compound are not loaded: %s; add them again with "
                    "`compound schedule add`, then drop the table %s", ", ".join(names), PICKLED_TABLE)
