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
    server_spec_errors,
    settings_of,
    spec_argument,
)


@click.group()
def schedule() -> None:
    """Scheduled retraining: pipelines submitted on cron or on new data, never two runs of one at once."""


_schedule_errors = exits_cleanly_on("pipelines.scheduler.ScheduleError")


class _Schedules:
    """The schedules through the compound server, where the settings name one (it checks the caller's role
    and audits every change), else in the scheduler's store directly. Each answers JSON-ready dicts."""

    def __init__(self, home: Path | None) -> None:
        from server.client import ServerClient

        self.home, self.settings = home, settings_of(home)
        self.server = ServerClient.of(self.settings) if self.settings.server_url else None

    @property
    def store(self) -> str:
        from pipelines.scheduler import store_url

        return store_url(self.settings, self.home)

    def add(self, spec, **how) -> dict:
        from jobs.spec import dump_spec
        from pipelines.scheduler import schedule_pipeline, shown

        if self.server:
            return self.server.request("POST", "/api/schedules", {"spec": dump_spec(spec), **how})
        return shown(schedule_pipeline(self.store, spec, self.settings, home=str(self.home) if self.home else None,
                                       **how))

    def list(self) -> list[dict]:
        from pipelines.scheduler import list_schedules, shown

        if self.server:
            return self.server.request("GET", "/api/schedules")
        return [shown(s) for s in list_schedules(self.store)]

    def change(self, name: str, action: str) -> dict | None:
        """pause, resume or remove."""
        from pipelines.scheduler import pause_schedule, remove_schedule, resume_schedule, shown

        if self.server:
            return self.server.request("DELETE" if action == "remove" else "POST",
                                       f"/api/schedules/{name}" + ("" if action == "remove" else f"/{action}"))
        done = {"pause": pause_schedule, "resume": resume_schedule, "remove": remove_schedule}[action](self.store, name)
        return shown(done) if done is not None else None

    def history(self, name: str | None, limit: int) -> list[dict]:
        from pipelines.scheduler import history, jsonable

        if self.server:
            return self.server.request("GET", "/api/schedules/history", **({"name": name} if name else {}), limit=limit)
        return [jsonable(row) for row in history(self.store, name, limit)]


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
@server_spec_errors
def add(spec_path: Path, cron: str | None, data_prefix: str | None, poll_s: float, name: str | None, replace: bool,
        home: Path | None) -> None:
    """Schedule the pipeline SPEC. The spec is checked now and stored with the schedule: later edits of
    the file change nothing until the schedule is added again."""
    from jobs.spec import SpecError
    from pipelines.scheduler import make_trigger
    from pipelines.spec import load_pipeline_spec

    try:
        spec = load_pipeline_spec(spec_path)
    except SpecError as error:
        fail_on_spec_error(error)
    make_trigger(cron=cron, data_prefix=data_prefix, poll_s=poll_s)  # a wrong trigger is named before anything
    added = _Schedules(home).add(spec, cron=cron, data_prefix=data_prefix, poll_s=poll_s, name=name, replace=replace)
    console.print(f"scheduled pipeline {spec.name} as [bold]{added['name']}[/bold]: {added['trigger']}; next run "
                  f"{when(added['next_run'])}", highlight=False, soft_wrap=True)


@schedule.command("list")
@json_option
@home_option
@server_spec_errors
def list_(as_json: bool, home: Path | None) -> None:
    """Every schedule: its pipeline, trigger and next run (paused: none)."""
    schedules = _Schedules(home).list()
    if as_json:
        click.echo(json.dumps(schedules))
        return
    table = Table("schedule", "pipeline", "trigger", "next run (UTC)")
    for s in schedules:
        table.add_row(s["name"], s["pipeline"], s["trigger"], when(s["next_run"]))
    console.print(table)


@schedule.command("pause")
@click.argument("name")
@home_option
@_schedule_errors
@server_spec_errors
def pause(name: str, home: Path | None) -> None:
    """Stop NAME firing until it is resumed."""
    _Schedules(home).change(name, "pause")
    console.print(f"schedule {name}: paused")


@schedule.command("resume")
@click.argument("name")
@home_option
@_schedule_errors
@server_spec_errors
def resume(name: str, home: Path | None) -> None:
    """Let NAME fire again, from its next time on."""
    resumed = _Schedules(home).change(name, "resume")
    console.print(f"schedule {name}: resumed; next run {when(resumed['next_run'])}")


@schedule.command("remove")
@click.argument("name")
@home_option
@_schedule_errors
@server_spec_errors
def remove(name: str, home: Path | None) -> None:
    """Delete NAME (its history stays)."""
    _Schedules(home).change(name, "remove")
    console.print(f"schedule {name}: removed")


@schedule.command("history")
@click.argument("name", required=False)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@json_option
@home_option
@server_spec_errors
def history_(name: str | None, limit: int, as_json: bool, home: Path | None) -> None:
    """What NAME's firings did (every schedule's without NAME), newest first: submitted, skipped, failed."""
    rows = _Schedules(home).history(name, limit)
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table("at (UTC)", "schedule", "action", "data", "submission / detail")
    for row in rows:
        table.add_row(when(row["at"]), row["schedule"], row["action"], row["data"] or "-",
                      row["submission_id"] or row["detail"] or "-")
    console.print(table)


def when(moment: str | None) -> str:
    """An ISO time as a person reads it (UTC)."""
    return moment[:19].replace("T", " ") if moment else "-"
