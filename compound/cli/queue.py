"""`compound queue`: what waits in the server's queue, in the order it will start, and why each waits;
`compound queue quota TEAM`: a team's limits. Also the submit commands' way through the server."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from compound.cli.common import (
    console,
    home_option,
    jobs_client,
    json_option,
    local_time,
    server_errors,
    server_of,
)
from server.queue import PRIORITIES


def queue_options(function):
    """--priority and --key of the submit commands."""
    function = click.option("--key", default=None, metavar="KEY",
                            help="An idempotency key: sending the same key again gives back the same submission "
                                 "(safe to retry).")(function)
    return click.option("--priority", type=click.Choice(tuple(PRIORITIES)), default=None,
                        help="The queue's priority class [default: normal].")(function)


def through_server(settings, *, address: str | None, dry_run: bool = False, priority: str | None = None,
                   key: str | None = None) -> bool:
    """Whether a submission goes through the server's queue: whenever one is configured (always after
    `compound up`), unless --address names a cluster or --dry-run checks against one directly."""
    direct = settings.server_url is None or address is not None or dry_run
    if direct and (priority or key):
        raise click.UsageError("--priority and --key are the compound server's queue's: leave out --address and "
                               "--dry-run, and configure a server (`compound up`, or COMPOUND_SERVER_URL)")
    return not direct


QUEUED_POLL_S = 1.0
ENDED_WAIT_S = 60.0


def submit_through_server(kind: str, spec, settings, *, priority: str | None, key: str | None, follow: bool,
                          from_stage: str | None = None) -> dict:
    """Send the spec (its files read in) to the server's queue and print what became of it; with `follow`,
    wait while it is queued, then print its log until it ends (exit 1 unless it succeeds)."""
    from jobs.spec import dump_spec
    from server.client import ServerClient

    server = ServerClient.of(settings)
    made = server.request("POST", "/api/submissions", {"kind": kind, "spec": dump_spec(spec),
                                                       "priority": priority or "normal", "key": key,
                                                       "from_stage": from_stage})
    console.print(f"submitted {kind} {made['name']} as [bold]{made['submission_id']}[/bold]", highlight=False,
                  soft_wrap=True)
    if made["state"] == "queued":
        console.print(f"queued at position {made['position']}: {made['reason']}\n`compound queue` shows the queue; "
                      f"`compound job stop {made['submission_id']}` takes it out", highlight=False, soft_wrap=True)
    elif made["state"] == "started":
        console.print(f"Ray dashboard: {jobs_client(settings, None).dashboard_url(made['submission_id'])}",
                      highlight=False, soft_wrap=True)
    if follow:
        follow_through_server(server, made["submission_id"])
    return made


def follow_through_server(server, ref: str) -> None:
    """Print the submission's log as the server streams it (from when it starts, if it waits), then how it
    ended and its MLflow run; exit 1 unless it succeeded."""
    from server.client import ServerError

    submission_id = server.request("GET", f"/api/jobs/{ref}")["submission_id"]
    for text in server.stream(f"/api/jobs/{submission_id}/logs/follow"):
        click.echo(text, nl=False)
    deadline = time.monotonic() + ENDED_WAIT_S  # the log ends a moment before Ray's status does
    while (ended := server.request("GET", f"/api/jobs/{submission_id}"))["status"] in ("PENDING", "RUNNING") \
            and time.monotonic() < deadline:
        time.sleep(QUEUED_POLL_S)
    style = "green" if ended["status"] == "SUCCEEDED" else "red"
    console.print(f"submission {ended['submission_id']}: [{style}]{ended['status']}[/{style}] {ended['message']}",
                  highlight=False, soft_wrap=True)
    if ended["mlflow_run"]:
        console.print(f"MLflow run: {ended['mlflow_run']}", highlight=False, soft_wrap=True)
    if ended["status"] != "SUCCEEDED":
        try:  # the cluster failed it: the server submits it again
            entry = server.request("GET", f"/api/submissions/{submission_id}")
        except ServerError:
            entry = {"reason": None}
        if "submitted again as" in (entry["reason"] or ""):
            console.print(f"{entry['reason']}: follow it with `compound job logs {ended['job']} --follow`",
                          highlight=False, soft_wrap=True)
        sys.exit(1)


@click.group(invoke_without_command=True)
@json_option
@home_option
@click.pass_context
@server_errors
def queue(context: click.Context, as_json: bool, home: Path | None) -> None:
    """The server's queue: what waits, in the order it will start and why, then what runs."""
    if context.invoked_subcommand is not None:
        return
    entries = server_of(home).request("GET", "/api/queue")
    if as_json:
        click.echo(json.dumps(entries))
        return
    if not entries:
        console.print("the queue is empty: nothing waits or runs through the server")
        return
    table = Table("#", "submission", "kind", "team", "user", "priority", "state", "since", "why it waits")
    for e in entries:
        since = e["started"] if e["state"] == "started" else e["enqueued"]
        table.add_row(str(e["position"] or "-"), e["submission_id"], e["kind"], e["team"], e["user"], e["priority"],
                      e["state"], local_time(since), e["reason"] or "-" if e["state"] == "queued" else "-")
    console.print(table)


@queue.command("quota")
@click.argument("team")
@click.option("--jobs", type=click.IntRange(min=0), default=None, help="Submissions running at once.")
@click.option("--cpus", type=click.FloatRange(min=0), default=None, help="CPUs held at once.")
@click.option("--gpus", type=click.FloatRange(min=0), default=None, help="GPUs held at once.")
@home_option
@server_errors
def quota(team: str, jobs: int | None, cpus: float | None, gpus: float | None, home: Path | None) -> None:
    """Set TEAM's quota (admins); a limit left out is no limit, so none at all removes the quota."""
    set_ = server_of(home).request("PUT", f"/api/quotas/{team}", {"jobs": jobs, "cpus": cpus, "gpus": gpus})
    limits = ", ".join(f"{name} ≤ {value:g}" for name, value in set_.items() if value is not None)
    console.print(f"team {team}: {limits or 'no quota'}", highlight=False)
