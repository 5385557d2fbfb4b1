"""Scheduled retraining against the real stack. A cheap one-stage pipeline (promote a registered version)
stands in for retraining: every firing submits it as a real Ray job.

With a controllable clock (APScheduler's, patched): runs missed while the scheduler was down collapse
into one catch-up run, a restart neither loses nor doubles a run, a firing while the pipeline is still
running submits nothing. Without it: the stack's scheduler service picks up a schedule added from the
CLI and runs the pipeline when a new manifest lands, on that manifest.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import apscheduler.schedulers.base
import apscheduler.triggers.interval
import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from cluster.data.manifest import ShardManifest
from compound.cli import cli
from infra.settings import Settings, load_settings
from infra.stack import Stack
from jobs.submit import JOB_KEY, JobsClient
from pipelines import scheduler
from pipelines.registry import register_version
from pipelines.runner import DATA_TAG
from pipelines.spec import load_pipeline_spec
from pipelines.stages.base import PIPELINE_TAG

START = datetime.datetime(2026, 11, 24, 10, 0, 30, tzinfo=datetime.UTC)
WAIT_S = 120.0


class Clock:
    """APScheduler's notion of now, moved by the test."""

    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def advance(self, **delta: float) -> None:
        self.now += datetime.timedelta(**delta)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    current = Clock(START)

    class ControlledDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return current.now.astimezone(tz) if tz else current.now

    for module in (apscheduler.schedulers.base, apscheduler.triggers.interval):
        monkeypatch.setattr(module, "datetime", ControlledDatetime)
    return current


@pytest.fixture
def pipeline_file(tmp_path: Path, settings: Settings, model_run: str, digits) -> Path:
    """A pipeline of one quick stage, under a name of its own, on the digits (a run checks its data is there)."""
    name = f"sched-{uuid.uuid4().hex[:6]}"
    version = register_version(settings.mlflow_tracking_uri, name=name, run_id=model_run, tags={},
                               metrics={"int8_top1": 0.9, "int8_change_points": -0.1, "majority_top1": 0.11}, gate=None)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "data": "s3://shards/digits/manifest.json",
        "stages": {"promote": {"uses": "promote", "with": {"model_name": name, "version": version}}}}))
    return path


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'schedules.db'}"


@pytest.fixture
def running() -> Iterator[list]:
    """Schedulers started by the test, shut down after it."""
    started: list = []
    yield started
    for instance in started:
        instance.shutdown(wait=True)


def _start(store: str, running: list, *, paused: bool = False):
    instance = scheduler.make_scheduler(store)
    instance.start(paused=paused)
    running.append(instance)
    return instance


def _submitted_in_next_pass(instance, clock: Clock) -> list[str]:
    """The schedules the scheduler submits the next time it goes through what is due (it is resumed if
    paused). A probe job due now, in a store of its own that the scheduler looks at after the schedules'
    store, marks the end of that pass: what is waited on is the pass itself, not a guess of its length.
    The probe's own submission event is the mark, not its run: a pass sends its events after submitting
    every due job, so the probe may have run before the schedules' events are out."""
    from apscheduler.events import EVENT_JOB_SUBMITTED
    from apscheduler.jobstores.memory import MemoryJobStore

    submitted, done, probe = [], threading.Event(), f"probe-{uuid.uuid4().hex[:6]}"

    def listen(event) -> None:
        if event.jobstore == probe:
            done.set()
        else:
            submitted.append(event.job_id)

    instance.add_listener(listen, EVENT_JOB_SUBMITTED)
    instance.add_jobstore(MemoryJobStore(), probe)
    instance.add_job(print, "date", run_date=clock.now, jobstore=probe, args=[f"{probe}: end of a pass"])
    instance.resume()
    try:
        assert done.wait(WAIT_S), "the scheduler did not go through its jobs"
    finally:
        instance.remove_listener(listen)
        instance.remove_jobstore(probe)
    return submitted


def _add(stack: Stack, pipeline: Path, *options: str) -> str:
    result = CliRunner().invoke(cli, ["schedule", "add", str(pipeline), *options, "--home", str(stack.home)])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(pipeline.read_text())["name"]


def _add_to(store: str, stack: Stack, pipeline: Path, *, cron: str) -> str:
    """`compound schedule add`'s work, in the test's own store (its scheduler runs on the test's clock; the
    CLI adds to the stack's server, whose scheduler does not)."""
    return scheduler.schedule_pipeline(store, load_pipeline_spec(pipeline), load_settings(stack.home), cron=cron,
                                       data_prefix=None, home=str(stack.home)).name


def _rows(store: str, name: str, count: int, *, within_s: float = WAIT_S) -> list[dict]:
    """The schedule's history once it has `count` rows other than `seen` (oldest first)."""
    deadline = time.monotonic() + within_s
    while True:
        rows = [r for r in scheduler.history(store, name) if r["action"] != "seen"][::-1]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _polled(store: str, name: str, *, times: int) -> None:
    """Wait until the service has polled a new-data schedule `times` more times (each poll moves its next run)."""

    def next_run() -> datetime.datetime | None:
        return next(s.next_run for s in scheduler.list_schedules(store) if s.name == name)

    runs = [next_run()]
    deadline = time.monotonic() + WAIT_S
    while len(runs) <= times:
        assert time.monotonic() < deadline, f"the service did not poll {name} {times} times"
        if (current := next_run()) != runs[-1]:
            runs.append(current)
        time.sleep(0.2)


def _wait_ended(settings: Settings, submission_id: str) -> str:
    client = JobsClient(settings.ray_dashboard_url, settings.ray_token)
    deadline = time.monotonic() + WAIT_S
    while (submission := client.find(submission_id)).active and time.monotonic() < deadline:
        time.sleep(1.0)
    return submission.status


def test_missed_runs_collapse_into_one_and_a_restart_neither_loses_nor_doubles_one(
        stack: Stack, settings: Settings, clock: Clock, store: str, pipeline_file: Path, running: list) -> None:
    name = _add_to(store, stack, pipeline_file, cron="* * * * *")
    (added,) = scheduler.list_schedules(store)
    assert added.next_run == datetime.datetime(2026, 11, 24, 10, 1, tzinfo=datetime.UTC)

    clock.advance(minutes=5)  # the scheduler was down through five firings (10:01 … 10:05)
    instance = _start(store, running)
    (fired,) = _rows(store, name, 1)
    assert fired["action"] == "submitted" and fired["data"] == "s3://shards/digits/manifest.json", fired
    assert _wait_ended(settings, fired["submission_id"]) == "SUCCEEDED"
    assert _submitted_in_next_pass(instance, clock) == []  # nothing more is due: one catch-up run, not five
    assert len(_rows(store, name, 2, within_s=0)) == 1
    assert scheduler.list_schedules(store)[0].next_run == datetime.datetime(2026, 11, 24, 10, 6, tzinfo=datetime.UTC)

    instance.shutdown(wait=True)  # a restart at the same moment: nothing is due again
    running.remove(instance)
    instance = _start(store, running, paused=True)
    assert _submitted_in_next_pass(instance, clock) == []  # its first pass
    assert len(_rows(store, name, 2, within_s=0)) == 1

    clock.advance(minutes=1)  # 10:06:30 — the next firing is neither lost nor doubled
    assert _submitted_in_next_pass(instance, clock) == [name]  # (the probe sees a submission when there is one)
    rows = _rows(store, name, 2)
    assert [r["action"] for r in rows] == ["submitted", "submitted"]
    assert _wait_ended(settings, rows[1]["submission_id"]) == "SUCCEEDED"

    # The pipeline was submitted as a pipeline run each time: visible in MLflow and `pipeline status`.
    result = CliRunner().invoke(cli, ["pipeline", "status", name, "--json", "--home", str(stack.home)])
    runs = json.loads(result.output)
    assert {r["submission_id"] for r in runs} == {r["submission_id"] for r in rows}
    assert all(r["status"] == "FINISHED" for r in runs)


def test_a_firing_while_the_pipeline_still_runs_submits_nothing(
        stack: Stack, settings: Settings, clock: Clock, store: str, pipeline_file: Path, running: list) -> None:
    name = _add_to(store, stack, pipeline_file, cron="*/2 * * * *")
    client = JobsClient(settings.ray_dashboard_url, settings.ray_token)
    # A run of the pipeline that is still going (a submission under its name that takes a while).
    standing = client.ray.submit_job(entrypoint="sleep 120", metadata={JOB_KEY: name})
    try:
        clock.advance(minutes=2)
        instance = _start(store, running)
        (skipped,) = _rows(store, name, 1)
        assert skipped["action"] == "skipped" and standing in skipped["detail"] and skipped["submission_id"] is None
    finally:
        client.stop(client.find(standing))
    clock.advance(minutes=2)
    instance.wakeup()
    rows = _rows(store, name, 2)
    assert [r["action"] for r in rows] == ["skipped", "submitted"]
    assert _wait_ended(settings, rows[1]["submission_id"]) == "SUCCEEDED"


def test_the_service_runs_a_pipeline_on_a_new_manifest_and_the_cli_manages_schedules(
        stack: Stack, settings: Settings, digits: ShardManifest, pipeline_file: Path) -> None:
    home = ("--home", str(stack.home))
    store = scheduler.store_url(settings, stack.home)  # the store of the stack's own scheduler service
    prefix = f"s3://shards/arrivals-{uuid.uuid4().hex[:6]}/"
    bucket, key = prefix[5:].split("/", 1)
    manifest = settings.s3_client().get_object(Bucket="shards", Key="digits/manifest.json")["Body"].read()
    settings.s3_client().put_object(Bucket=bucket, Key=f"{key}2026-11-01/manifest.json", Body=manifest)
    name = _add(stack, pipeline_file, "--on-new-data", prefix, "--poll", "2")
    seen = scheduler.history(store, name)
    assert [(r["action"], r["data"]) for r in seen] == [("seen", f"{prefix}2026-11-01/manifest.json")]
    _polled(store, name, times=2)  # the service looked at the prefix twice: nothing new, nothing runs
    assert _rows(store, name, 1, within_s=0) == []

    settings.s3_client().put_object(Bucket=bucket, Key=f"{key}2026-11-24/manifest.json", Body=manifest)
    (fired,) = _rows(store, name, 1)
    assert fired["action"] == "submitted" and fired["data"] == f"{prefix}2026-11-24/manifest.json"
    audit = json.loads(CliRunner().invoke(cli, ["audit", "--json", *home]).output)  # through the server's queue
    assert ("scheduler", "submission.add", fired["submission_id"]) in {(e["who"], e["action"], e["target"])
                                                                       for e in audit}
    assert _wait_ended(settings, fired["submission_id"]) == "SUCCEEDED"
    client = MlflowClient(settings.mlflow_tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                f"tags.`{PIPELINE_TAG}` = '{name}' and tags.`{DATA_TAG}` LIKE 's3://%'")
    assert run.data.tags[DATA_TAG] == fired["data"]  # the new manifest became the pipeline's data

    listed = json.loads(CliRunner().invoke(cli, ["schedule", "list", "--json", *home]).output)
    assert [s["pipeline"] for s in listed if s["name"] == name] == [name]
    assert CliRunner().invoke(cli, ["schedule", "pause", name, *home]).exit_code == 0
    paused = json.loads(CliRunner().invoke(cli, ["schedule", "list", "--json", *home]).output)
    assert next(s for s in paused if s["name"] == name)["next_run"] is None
    assert CliRunner().invoke(cli, ["schedule", "resume", name, *home]).exit_code == 0
    result = CliRunner().invoke(cli, ["schedule", "history", name, *home])
    assert result.exit_code == 0 and "submitted" in result.output
    shown = json.loads(CliRunner().invoke(cli, ["schedule", "history", name, "--json", *home]).output)
    assert [(r["action"], r["submission_id"]) for r in shown] == [("submitted", fired["submission_id"]), ("seen", None)]
    assert CliRunner().invoke(cli, ["schedule", "remove", name, *home]).exit_code == 0
    result = CliRunner().invoke(cli, ["schedule", "remove", name, *home])
    assert result.exit_code == 1 and f"no schedule named {name}" in result.output


def test_a_wrong_schedule_is_refused_and_stores_nothing(stack: Stack, settings: Settings, pipeline_file: Path) -> None:
    home = ("--home", str(stack.home))
    for options, expected in ((["--cron", "every night"], "five fields"),
                              (["--on-new-data", "shards/new"], "S3 prefix ending in /"),
                              ([], "either --cron or --on-new-data")):
        result = CliRunner().invoke(cli, ["schedule", "add", str(pipeline_file), *options, *home])
        assert result.exit_code == 1 and expected in result.output, result.output
    name = yaml.safe_load(pipeline_file.read_text())["name"]
    assert name not in {s.name for s in scheduler.list_schedules(scheduler.store_url(settings, stack.home))}
    stored = settings.s3_client().list_objects_v2(Bucket="checkpoints", Prefix=f"pipelines/{name}/schedules/")
    assert not stored.get("Contents")


def test_schedules_are_stored_as_json_rows_and_pickles_are_never_loaded(tmp_path: Path, store: str, caplog) -> None:
    import pickle
    import sqlite3

    trigger = scheduler.make_trigger(cron="0 2 * * 1-5", data_prefix=None)
    added = scheduler.add_schedule(store, trigger, name="nightly", pipeline="demo", spec_uri="s3://c/p.yaml",
                                   home=None)
    polling = scheduler.add_schedule(store, scheduler.make_trigger(cron=None, data_prefix="s3://shards/x/", poll_s=30),
                                     name="on-data", pipeline="demo", spec_uri="s3://c/p.yaml", home=None,
                                     data_prefix="s3://shards/x/", settings=_NoManifests())
    database = sqlite3.connect(store.removeprefix("sqlite:///"))
    rows = dict(database.execute("select id, job_state from compound_schedule_rows").fetchall())
    nightly = json.loads(rows["nightly"])  # plain data, readable with SQL
    assert nightly["trigger"] == {"cron": "0 2 * * mon,tue,wed,thu,fri"}  # crontab's 1-5, Monday to Friday
    assert nightly["kwargs"]["spec_uri"] == "s3://c/p.yaml"
    assert json.loads(rows["on-data"])["trigger"]["every_s"] == 30
    listed = {s.name: s for s in scheduler.list_schedules(store)}  # read back: the same schedules
    assert listed["nightly"].next_run == added.next_run and added.next_run.weekday() < 5
    assert listed["nightly"].trigger == "cron 0 2 * * mon,tue,wed,thu,fri (UTC)"
    assert listed["on-data"].trigger == polling.trigger

    # A pickle written into the table (as a write to the database could) is not run: the row is dropped.
    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    database.execute("update compound_schedule_rows set job_state = ? where id = 'nightly'", (pickle.dumps(Boom()),))
    # And schedules an earlier version pickled, in their own table, are named, never unpickled.
    database.execute("create table compound_schedules (id varchar(191) primary key, next_run_time float, "
                     "job_state blob not null)")
    database.execute("insert into compound_schedules values ('old-nightly', 0, ?)", (pickle.dumps(Boom()),))
    database.commit()
    with caplog.at_level("WARNING"):
        assert [s.name for s in scheduler.list_schedules(store)] == ["on-data"]
    assert not (tmp_path / "pwned").exists()
    assert "old-nightly" in caplog.text and "compound schedule add" in caplog.text


class _NoManifests:
    """Settings whose S3 prefix holds no manifests (a new-data schedule lists them when added)."""

    def s3_client(self):
        class Empty:
            def get_paginator(self, _):
                return self

            def paginate(self, **_):
                return [{}]

        return Empty()


@pytest.mark.parametrize(("cron", "weekdays"), [("0 2 * * 1", {0}), ("0 2 * * 1-5", {0, 1, 2, 3, 4}),
                                                ("0 2 * * 0", {6}), ("0 2 * * 7", {6}), ("0 2 * * */3", {6, 2, 5}),
                                                ("0 2 * * sat,sun", {5, 6}), ("0 2 * * *", set(range(7)))])
def test_cron_weekdays_read_as_crontab_does_sunday_zero(cron: str, weekdays: set[int]) -> None:
    trigger = scheduler.make_trigger(cron=cron, data_prefix=None)
    fired, at = set(), START
    for _ in range(7):
        at = trigger.get_next_fire_time(None, at + datetime.timedelta(minutes=1))
        fired.add(at.weekday())  # Python's: Monday is 0
    assert fired == weekdays


def test_a_weekday_span_that_runs_backwards_is_refused() -> None:
    with pytest.raises(scheduler.ScheduleError, match="runs backwards"):
        scheduler.make_trigger(cron="0 2 * * 5-1", data_prefix=None)
