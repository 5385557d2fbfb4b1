"""`compound schedule …`: run a pipeline on a cron schedule or when a new dataset manifest lands, through
the scheduler service that `compound up` starts (`pipelines.scheduler`)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from compound.cli.common import (
    console,
    exits_cleanly_on,
    fail_on_spec_error,
    home_option,
    json_option,
    settings_of,
    spec_argument,
)


@click.group()
def schedule() -> None:
    """Scheduled retraining: pipelines submitted on cron or on new data, never two runs of one at once."""


_schedule_errors = exits_cleanly_on("pipelines.scheduler.ScheduleError")


def _store(home: Path | None) -> str:
    from pipelines.scheduler import store_url

    return store_url(settings_of(home), home)


@schedule.command("add")
@spec_argument
@click.option("--cron", default=None, metavar="EXPR", help="Five-field cron expression in UTC, e.g. '0 2 * * *'.")
@click.option("--on-new-data", "data_prefix", default=None, metavar="S3_PREFIX",
              help="Run when a new manifest.json appears under this prefix; it becomes the pipeline's data.")
@click.option("--poll", "poll_s", default=60.0, show_default=True, type=click.FloatRange(min=1),
              help="With --on-new-data: seconds between looks at the prefix.")
@click.option("--name", default=None, help="The schedule's name [default: the pipeline's].")
@click.option("--replace", is_flag=True, help="Replace a schedule of the same name.")
@home_option
@_schedule_errors
def add(spec_path: Path, cron: str | None, data_prefix: str | None, poll_s: float, name: str | None, replace: bool,
        home: Path | None) -> None:
    """Schedule the pipeline SPEC. The spec is checked now and stored with the schedule: later edits of
    the file change nothing until the schedule is added again."""
    import re

    from cluster.storage import split_s3_url
    from jobs.s3 import s3_access
    from jobs.spec import SpecError, dump_spec
    from pipelines.scheduler import SCHEDULE_NAME_PATTERN, ScheduleError, add_schedule, list_schedules, make_trigger
    from pipelines.spec import load_pipeline_spec
    from pipelines.stages.base import PIPELINE_STORAGE_PREFIX

    try:
        spec = load_pipeline_spec(spec_path)
    except SpecError as error:
        fail_on_spec_error(error)
    trigger = make_trigger(cron=cron, data_prefix=data_prefix, poll_s=poll_s)
    name = name or spec.name
    if not re.match(SCHEDULE_NAME_PATTERN, name):
        raise ScheduleError(f"--name {name!r}: lowercase letters, digits and -, at most 63")
    settings, url = settings_of(home), _store(home)
    if not replace and name in {s.name for s in list_schedules(url)}:
        raise ScheduleError(f"a schedule named {name} exists; remove it first, pass --replace, or pass --name")
    spec_uri = f"s3://{settings.checkpoints_bucket}/{PIPELINE_STORAGE_PREFIX}/{spec.name}/schedules/{name}.yaml"
    bucket, key = split_s3_url(spec_uri)
    store = s3_access(settings).client()
    store.put_object(Bucket=bucket, Key=key, Body=dump_spec(spec).encode(), ContentType="application/yaml")
    try:
        added = add_schedule(url, trigger, name=name, pipeline=spec.name, spec_uri=spec_uri,
                             home=str(home) if home else None, data_prefix=data_prefix, settings=settings,
                             replace=replace)
    except BaseException:
        if not replace:  # a schedule it would have replaced reads the spec there
            store.delete_object(Bucket=bucket, Key=key)
        raise
    console.print(f"scheduled pipeline {spec.name} as [bold]{added.name}[/bold]: {added.trigger}; next run "
                  f"{when(added.next_run)}", highlight=False, soft_wrap=True)


@schedule.command("list")
@json_option
@home_option
def list_(as_json: bool, home: Path | None) -> None:
    """Every schedule: its pipeline, trigger and next run (paused: none)."""
    from pipelines.scheduler import list_schedules

    schedules = list_schedules(_store(home))
    if as_json:
        click.echo(json.dumps([{**s.__dict__, "next_run": s.next_run.isoformat() if s.next_run else None}
                               for s in schedules]))
        return
    table = Table("schedule", "pipeline", "trigger", "next run (UTC)")
    for s in schedules:
        table.add_row(s.name, s.pipeline, s.trigger, when(s.next_run))
    console.print(table)


@schedule.command("pause")
@click.argument("name")
@home_option
@_schedule_errors
def pause(name: str, home: Path | None) -> None:
    """Stop NAME firing until it is resumed."""
    from pipelines.scheduler import pause_schedule

    pause_schedule(_store(home), name)
    console.print(f"schedule {name}: paused")


@schedule.command("resume")
@click.argument("name")
@home_option
@_schedule_errors
def resume(name: str, home: Path | None) -> None:
    """Let NAME fire again, from its next time on."""
    from pipelines.scheduler import resume_schedule

    resumed = resume_schedule(_store(home), name)
    console.print(f"schedule {name}: resumed; next run {when(resumed.next_run)}")


@schedule.command("remove")
@click.argument("name")
@home_option
@_schedule_errors
def remove(name: str, home: Path | None) -> None:
    """Delete NAME (its history stays)."""
    from pipelines.scheduler import remove_schedule

    remove_schedule(_store(home), name)
    console.print(f"schedule {name}: removed")


@schedule.command("history")
@click.argument("name", required=False)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@json_option
@home_option
def history_(name: str | None, limit: int, as_json: bool, home: Path | None) -> None:
    """What NAME's firings did (every schedule's without NAME), newest first: submitted, skipped, failed."""
    from pipelines.scheduler import history

    rows = history(_store(home), name, limit)
    if as_json:
        click.echo(json.dumps([{**row, "at": row["at"].isoformat()} for row in rows]))
        return
    table = Table("at (UTC)", "schedule", "action", "data", "submission / detail")
    for row in rows:
        table.add_row(when(row["at"]), row["schedule"], row["action"], row["data"] or "-",
                      row["submission_id"] or row["detail"] or "-")
    console.print(table)


def when(moment) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"
