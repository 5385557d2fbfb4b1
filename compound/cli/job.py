"""`compound job …`: validate a training job spec, run it on the Ray cluster, or submit it as a Ray job
and watch it (list, status, logs, stop)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from compound.cli.common import (
    address_option,
    console,
    driver_errors,
    follow_submission,
    home_option,
    jobs_client,
    json_option,
    local_time,
    log_kept,
    print_dry_run,
    read_spec,
    server_errors,
    server_spec_errors,
    settings_of,
    spec_argument,
    spec_errors,
    submission_errors,
    submit_and_print,
    wait_for_run,
)
from compound.cli.queue import follow_through_server, queue_options, submit_through_server, through_server
from server.client import ServerClient

EPOCH_COLUMNS = (  # what a person reads after a run: (header, (metric, format))
    ("epoch", ("epoch", str)),
    ("samples", ("train_samples_epoch", str)),
    ("train loss", ("train_loss", "{:.4f}".format)),
    ("val loss", ("val_loss", "{:.4f}".format)),
    ("val top-1", ("val_top1", "{:.1%}".format)),
    ("val top-5", ("val_top5", "{:.1%}".format)),
    ("EMA top-1", ("ema_val_top1", "{:.1%}".format)),
    ("img/s", ("train_images_per_s", "{:.0f}".format)),
)


@click.group()
def job() -> None:
    """Training jobs: validate a spec, run or submit it to the Ray cluster, watch submissions."""


@job.command("validate")
@spec_argument
@click.option("--offline", is_flag=True, help="Check the spec alone, not its datasets and storage on S3.")
@home_option
@spec_errors
def validate(spec_path: Path, offline: bool, home: Path | None) -> None:
    """Print SPEC resolved, with every default; or what is wrong with it (exit 2)."""
    from jobs.driver import prepare_job
    from jobs.spec import dump_spec, load_job_spec

    spec = load_job_spec(spec_path)
    if not offline:
        spec = prepare_job(spec, settings_of(home), source=str(spec_path)).spec
    console.print(dump_spec(spec), highlight=False, markup=False, end="")


@job.command("run")
@click.argument("spec_ref", metavar="SPEC")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON (for scripts).")
@click.option("--submission-id", default=None, hidden=True, help="The Ray submission running this driver.")
@home_option
@log_kept
@spec_errors
@driver_errors
def run(spec_ref: str, as_json: bool, submission_id: str | None, home: Path | None) -> None:
    """Run SPEC (a file, or an s3:// URI) on the configured Ray cluster and wait for it: the driver a
    submitted job runs.

    Run again after an interruption, the same job resumes from its latest checkpoint, in the same MLflow run.
    """
    from jobs.driver import run_job
    from jobs.spec import load_job_spec, load_job_spec_text

    spec, settings = read_spec(spec_ref, home, from_file=load_job_spec, from_text=load_job_spec_text)
    outcome = run_job(spec, settings, source=spec_ref, submission_id=submission_id)
    if as_json:
        click.echo(json.dumps({"job": outcome.spec.name, "checkpoint": outcome.checkpoint, "resumed": outcome.resumed,
                               "mlflow_run_id": outcome.run.run_id, "epochs": outcome.history}))
        return
    table = Table(*(label for label, _ in EPOCH_COLUMNS), title=f"job {outcome.spec.name}: done")
    for epoch in outcome.history:
        table.add_row(*(fmt(epoch[key]) if key in epoch else "-" for (_, (key, fmt)) in EPOCH_COLUMNS))
    console.print(table)
    console.print(f"checkpoint: {outcome.checkpoint or '-'}\nMLflow run: {outcome.run.url}", highlight=False,
                  soft_wrap=True)


# --- submissions ------------------------------------------------------------------------------------

@job.command("submit")
@spec_argument
@address_option
@click.option("--dry-run", is_flag=True, help="Check everything, submit nothing.")
@click.option("--follow", is_flag=True, help="Print the job's log until it ends; exit non-zero unless it succeeds.")
@queue_options
@home_option
@spec_errors
@submission_errors
@server_spec_errors
def submit(spec_path: Path, address: str | None, dry_run: bool, follow: bool, priority: str | None, key: str | None,
           home: Path | None) -> None:
    """Submit SPEC to the Ray cluster as a Ray job running `compound job run`: through the compound server's
    queue when one is configured (always after `compound up`), where it waits for room and its team's quota.

    Checks the spec, its datasets and storage, that the cluster can ever hold the job's workers, and that
    the job is not running already. Prints the submission id, the Ray dashboard link and the MLflow run link
    (or, while it waits, its place in the queue and why).
    """
    from jobs.spec import load_job_spec
    from jobs.submit import plan_submission

    settings = settings_of(home)
    if through_server(settings, address=address, dry_run=dry_run, priority=priority, key=key):
        made = submit_through_server("job", load_job_spec(spec_path), settings, priority=priority, key=key,
                                     follow=follow)
        if not follow and made["state"] == "started":
            run = wait_for_run(settings, jobs_client(settings, None), made["submission_id"])
            console.print(f"MLflow run: {run.url if run else 'not created yet; `compound job status` shows it once it is'}",
                          highlight=False, soft_wrap=True)
        return
    client = jobs_client(settings, address)
    # The autoscaling limits are read from the configured cluster's GCS, not from another --address.
    plan = plan_submission(spec_path, settings, client, gcs_address=None if address else settings.ray_address)
    if dry_run:
        print_dry_run("job", plan, client)
        return
    submit_and_print("job", plan, settings, client, follow=follow)
    if not follow:
        run = wait_for_run(settings, client, plan.submission_id)
        console.print(f"MLflow run: {run.url if run else 'not created yet; `compound job status` shows it once it is'}",
                      highlight=False, soft_wrap=True)


@job.command("list")
@address_option
@json_option
@home_option
@submission_errors
@server_errors
def list_(address: str | None, as_json: bool, home: Path | None) -> None:
    """The cluster's compound submissions, newest last, then those waiting in the server's queue."""
    import dataclasses

    from jobs.submit import Submission
    from server import job_views

    settings = settings_of(home)
    if through_server(settings, address=address):
        submissions = [Submission(**s) for s in ServerClient.of(settings).request("GET", "/api/jobs")]
    else:
        submissions = job_views.submissions(jobs_client(settings, address), settings)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(s) for s in submissions]))
        return
    table = Table("submission", "job", "status", "started", "ended", "message")
    for s in submissions:
        table.add_row(s.submission_id, s.job, s.status, local_time(s.start_time), local_time(s.end_time), s.message[:80])
    console.print(table)


@job.command("status")
@click.argument("ref", metavar="REF")
@address_option
@json_option
@home_option
@submission_errors
@server_errors
def status(ref: str, address: str | None, as_json: bool, home: Path | None) -> None:
    """A submission's status, by submission id or job name (its latest submission)."""
    import dataclasses

    from server import job_views

    settings = settings_of(home)
    if through_server(settings, address=address):
        shown = ServerClient.of(settings).request("GET", f"/api/jobs/{ref}")
    else:
        client = jobs_client(settings, address)
        found = job_views.find(client, settings, ref)
        shown = {**dataclasses.asdict(found), **job_views.links(client, settings, found)}
    if as_json:
        click.echo(json.dumps(shown))
        return
    table = Table(show_header=False, box=None)
    for label, key in (("submission", "submission_id"), ("job", "job"), ("status", "status"), ("message", "message"),
                       ("started", "start_time"), ("ended", "end_time"), ("spec", "spec"),
                       ("Ray dashboard", "dashboard"), ("MLflow run", "mlflow_run")):
        value = local_time(shown[key]) if key.endswith("_time") else shown[key]
        table.add_row(label, value or "-")
    console.print(table)


@job.command("logs")
@click.argument("ref", metavar="REF")
@address_option
@click.option("--follow", is_flag=True, help="Keep printing until the job ends.")
@home_option
@submission_errors
@server_errors
def logs(ref: str, address: str | None, follow: bool, home: Path | None) -> None:
    """A submission's log (its driver's output), by submission id or job name; from the copy kept on S3
    when Ray no longer knows the submission (its head restarted) or cannot be reached. A submission the
    server retried shows every attempt's log, first first."""
    from jobs.submit import SubmissionError
    from server import job_views

    settings = settings_of(home)
    if follow and through_server(settings, address=address):
        follow_through_server(ServerClient.of(settings), ref)
        return
    if follow:  # from Ray as it grows
        client = jobs_client(settings, address)
        follow_submission(settings, client, client.find(ref).submission_id)
        return
    if through_server(settings, address=address):
        kept = job_views.Log(**ServerClient.of(settings).request("GET", f"/api/jobs/{ref}/logs"))
    else:
        try:
            client = jobs_client(settings, address)
        except SubmissionError:
            client = None
        kept = job_views.log(settings, ref, client)
    if kept.note:
        click.echo(f"({kept.note})", err=True)
    click.echo(kept.text, nl=False)


@job.command("stop")
@click.argument("ref", metavar="REF")
@address_option
@home_option
@submission_errors
@server_errors
def stop(ref: str, address: str | None, home: Path | None) -> None:
    """Stop a submission, by submission id or job name; its checkpoints stay, so submitting again resumes it.
    One waiting in the server's queue is taken out of it."""
    from server.client import ServerError

    settings = settings_of(home)
    if through_server(settings, address=address):
        try:
            ended = ServerClient.of(settings).request("POST", f"/api/submissions/{ref}/stop")
        except ServerError as error:
            if error.status != 404:  # 404: not the queue's (submitted straight to Ray): stopped there
                raise
        else:
            state = "CANCELLED (taken out of the queue)" if ended["state"] == "cancelled" else ended["reason"]
            console.print(f"submission {ended['submission_id']} of {ended['kind']} {ended['name']}: {state}",
                          highlight=False, soft_wrap=True)
            return
    client = jobs_client(settings, address)
    found = client.find(ref)
    ended = client.stop(found)
    console.print(f"submission {ended.submission_id} of job {ended.job}: {ended.status}", highlight=False,
                  soft_wrap=True)
