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
    run_of,
    settings_of,
    spec_argument,
    spec_errors,
    submission_errors,
    submit_and_print,
    wait_for_run,
)
from compound.cli.queue import (
    earlier_attempts,
    queue_options,
    queued_submissions,
    server_errors,
    submit_through_server,
    through_server,
)

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
@server_errors
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
def list_(address: str | None, as_json: bool, home: Path | None) -> None:
    """The cluster's compound submissions, newest last."""
    import dataclasses

    settings = settings_of(home)
    submissions = _timeouts_shown(settings, jobs_client(settings, address).submissions())
    if address is None:
        submissions += queued_submissions(settings)
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
def status(ref: str, address: str | None, as_json: bool, home: Path | None) -> None:
    """A submission's status, by submission id or job name (its latest submission)."""
    import dataclasses

    from jobs.submit import SubmissionError

    settings = settings_of(home)
    client = jobs_client(settings, address)
    try:
        (found,) = _timeouts_shown(settings, [client.find(ref)])
    except SubmissionError:
        waiting = [s for s in ([] if address else queued_submissions(settings)) if ref in (s.submission_id, s.job)]
        if not waiting:
            raise
        found = waiting[-1]
    run = run_of(settings, found)
    links = {"dashboard": client.dashboard_url(found.submission_id), "mlflow_run": run.url if run else None}
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(found), **links}))
        return
    table = Table(show_header=False, box=None)
    for label, value in (("submission", found.submission_id), ("job", found.job), ("status", found.status),
                         ("message", found.message or "-"), ("started", local_time(found.start_time)),
                         ("ended", local_time(found.end_time)), ("spec", found.spec or "-"),
                         ("Ray dashboard", links["dashboard"]), ("MLflow run", links["mlflow_run"] or "-")):
        table.add_row(label, value)
    console.print(table)


def _timeouts_shown(settings, submissions: list) -> list:
    """Submissions stopped for running past their max_runtime read TIMED_OUT (Ray says STOPPED)."""
    from jobs.s3 import s3_access
    from jobs.timeouts import with_timeouts

    return with_timeouts(submissions, s3_access(settings), settings.checkpoints_bucket)


@job.command("logs")
@click.argument("ref", metavar="REF")
@address_option
@click.option("--follow", is_flag=True, help="Keep printing until the job ends.")
@home_option
@submission_errors
def logs(ref: str, address: str | None, follow: bool, home: Path | None) -> None:
    """A submission's log (its driver's output), by submission id or job name; from the copy kept on S3
    when Ray no longer knows the submission (its head restarted) or cannot be reached."""
    from jobs.driver_log import read_kept
    from jobs.s3 import s3_access
    from jobs.submit import SubmissionError

    settings = settings_of(home)
    try:
        client = jobs_client(settings, address)
        found = client.find(ref)
    except SubmissionError as error:
        kept = read_kept(s3_access(settings), settings.checkpoints_bucket, ref)
        if kept is None:
            raise
        click.echo(f"({error.args[0].split(';')[0]}: the log of {kept[0]} kept on S3)", err=True)
        click.echo(kept[1], nl=False)
        return
    earlier = [] if address else earlier_attempts(settings, found.submission_id)
    for attempt in earlier:  # a retried submission's log is read whole: every attempt's, first first
        kept = read_kept(s3_access(settings), settings.checkpoints_bucket, attempt["submission_id"])
        click.echo(f"--- attempt {attempt['attempt']}: {attempt['submission_id']} ({attempt['reason']}) ---")
        click.echo(kept[1] if kept else "(no log kept)\n", nl=False)
    if earlier:
        click.echo(f"--- attempt {len(earlier) + 1}: {found.submission_id} ---")
    if follow:
        follow_submission(settings, client, found.submission_id)
        return
    click.echo(client.logs(found.submission_id), nl=False)


@job.command("stop")
@click.argument("ref", metavar="REF")
@address_option
@home_option
@submission_errors
def stop(ref: str, address: str | None, home: Path | None) -> None:
    """Stop a submission, by submission id or job name; its checkpoints stay, so submitting again resumes it.
    One waiting in the server's queue is taken out of it."""
    from server.client import ServerClient, ServerError

    settings = settings_of(home)
    if through_server(settings, address=address):
        try:
            ended = ServerClient.of(settings).request("POST", f"/api/submissions/{ref}/stop")
        except ServerError as error:
            if error.status != 404:  # 404: not the queue's (submitted straight to Ray): stopped there
                raise click.ClickException(str(error)) from None
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
