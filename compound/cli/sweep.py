"""`compound sweep …`: validate a sweep spec, run its driver against the Ray cluster, or submit it as a
Ray job (then watched with `compound job list|status|logs|stop`, as any submission)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from compound.cli.common import (
    address_option,
    console,
    driver_errors,
    home_option,
    jobs_client,
    log_kept,
    print_dry_run,
    read_spec,
    server_spec_errors,
    settings_of,
    spec_argument,
    spec_errors,
    submission_errors,
    submit_and_print,
)
from compound.cli.queue import queue_options, submit_through_server, through_server


@click.group()
def sweep() -> None:
    """Sweeps: Ray Tune over a training job's fields, ASHA stopping bad trials, one MLflow parent run."""


@sweep.command("validate")
@spec_argument
@click.option("--offline", is_flag=True, help="Check the spec alone, not the base job's datasets and storage.")
@home_option
@spec_errors
def validate(spec_path: Path, offline: bool, home: Path | None) -> None:
    """Print SPEC with every default, the base job resolved inline; or what is wrong with it (exit 2).

    Every value the space can sample is checked as a job spec: each dimension at its extremes, and all
    dimensions at their lows and at their highs together.
    """
    from jobs.driver import prepare_job
    from jobs.spec import dump_spec, load_sweep_spec

    spec = load_sweep_spec(spec_path)
    job = spec.base_job
    if not offline:
        job = prepare_job(job, settings_of(home), source=f"{spec_path}: job").spec
    shown = spec.model_copy(update={"job": job.model_dump(mode="json")})
    console.print(dump_spec(shown), highlight=False, markup=False, end="")


@sweep.command("run")
@click.argument("spec_ref", metavar="SPEC")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON (for scripts).")
@click.option("--submission-id", default=None, hidden=True, help="The Ray submission running this driver.")
@home_option
@log_kept
@spec_errors
@driver_errors
def run(spec_ref: str, as_json: bool, submission_id: str | None, home: Path | None) -> None:
    """Run the sweep SPEC (a file, or an s3:// URI) on the configured Ray cluster and wait for it.

    Run again after an interruption, the sweep resumes: finished trials stay finished, unfinished ones
    continue from their checkpoints, each in its own child run.
    """
    from jobs.spec import load_sweep_spec, load_sweep_spec_text
    from jobs.sweep import run_sweep_job

    spec, settings = read_spec(spec_ref, home, from_file=load_sweep_spec, from_text=load_sweep_spec_text)
    outcome = run_sweep_job(spec, settings, source=spec_ref, submission_id=submission_id)
    if as_json:
        click.echo(json.dumps({"sweep": spec.name, "best": outcome.best, "best_uri": outcome.best_uri,
                               "parent_run_id": outcome.parent.run_id, "trials": outcome.trials}))
        return
    table = Table("trial", *spec.space, spec.metric, "epochs", "status", title=f"sweep {spec.name}: done")
    for trial in outcome.trials:
        value = "-" if trial["value"] is None else f"{trial['value']:.4g}"
        marker = " (best)" if trial["trial"] == outcome.best["trial"] else ""
        table.add_row(trial["trial"] + marker, *(f"{trial['config'][p]:.4g}" if isinstance(trial["config"][p], float)
                                                 else str(trial["config"][p]) for p in spec.space),
                      value, str(trial["epochs"]), trial["status"])
    console.print(table)
    console.print(f"best: trial {outcome.best['trial']}, {spec.metric} {outcome.best['value']:.4g}, checkpoint "
                  f"{outcome.best['checkpoint']}\nrecorded in {outcome.best_uri}\nMLflow parent run: {outcome.parent.url}",
                  highlight=False, soft_wrap=True)


@sweep.command("submit")
@spec_argument
@address_option
@click.option("--dry-run", is_flag=True, help="Check everything, submit nothing.")
@click.option("--follow", is_flag=True, help="Print the sweep's log until it ends; exit non-zero unless it succeeds.")
@queue_options
@home_option
@spec_errors
@submission_errors
@server_spec_errors
def submit(spec_path: Path, address: str | None, dry_run: bool, follow: bool, priority: str | None, key: str | None,
           home: Path | None) -> None:
    """Submit the sweep SPEC to the Ray cluster as a Ray job running `compound sweep run` (through the
    compound server's queue when one is configured).

    Watch it with `compound job status|logs|stop NAME` and in the MLflow parent run.
    """
    from jobs.spec import load_sweep_spec
    from jobs.submit import plan_sweep_submission

    settings = settings_of(home)
    if through_server(settings, address=address, dry_run=dry_run, priority=priority, key=key):
        submit_through_server("sweep", load_sweep_spec(spec_path), settings, priority=priority, key=key, follow=follow)
        return
    client = jobs_client(settings, address)
    plan = plan_sweep_submission(spec_path, settings, client)
    if dry_run:
        print_dry_run("sweep", plan, client)
        return
    submit_and_print("sweep", plan, settings, client, follow=follow)
