"""`compound pipeline …`: validate a pipeline, run its driver against the cluster, submit it as a Ray job,
and see its runs with each stage's status and outputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from rich.table import Table

from compound.cli.common import (
    address_option,
    console,
    driver_errors,
    home_option,
    jobs_client,
    json_option,
    local_time,
    log_kept,
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
def pipeline() -> None:
    """Pipelines: stages (train, sweep, distill, quantize, evaluate, register, promote) wired by their outputs."""


def _data_option(function):
    return click.option("--data", default=None, metavar="S3_MANIFEST",
                        help="Run on this dataset manifest instead of the spec's `data`.")(function)


def _from_option(function):
    return click.option("--from", "from_stage", default=None, metavar="STAGE",
                        help="Run STAGE and every stage after it anew, reusing the stages before it.")(function)


@pipeline.command("validate")
@spec_argument
@_data_option
@spec_errors
def validate(spec_path: Path, data: str | None) -> None:
    """Print SPEC with its job and sweep files read in, every default spelled out; or every problem (exit 2)."""
    from jobs.spec import dump_spec
    from pipelines.spec import load_pipeline_spec, with_data

    spec = with_data(load_pipeline_spec(spec_path), data, str(spec_path))
    console.print(dump_spec(spec), highlight=False, markup=False, end="")
    console.print(f"# order: {' → '.join(spec.order())}", highlight=False, markup=False)


@pipeline.command("run")
@click.argument("spec_ref", metavar="SPEC")
@_data_option
@_from_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON (for scripts).")
@click.option("--submission-id", default=None, hidden=True, help="The Ray submission running this driver.")
@home_option
@log_kept
@spec_errors
@driver_errors
def run(spec_ref: str, data: str | None, from_stage: str | None, as_json: bool, submission_id: str | None,
        home: Path | None) -> None:
    """Run the pipeline SPEC (a file, or an s3:// URI) in this process against the cluster, and wait for it.

    Run again after it failed, it resumes at the failed stage, reusing the stages that finished.
    """
    from mlflow.exceptions import MlflowException

    from pipelines.runner import run_pipeline
    from pipelines.spec import check_from, load_pipeline_spec, load_pipeline_spec_text, with_data

    def checked(spec):  # --data and --from too, before the settings are read for a file
        spec = with_data(spec, data, spec_ref)
        check_from(spec, from_stage)
        return spec

    started = time.monotonic()
    spec, settings = read_spec(spec_ref, home, from_file=lambda path: checked(load_pipeline_spec(path)),
                               from_text=lambda text, source: checked(load_pipeline_spec_text(text, source)))
    try:
        outcome = run_pipeline(spec, settings, from_stage=from_stage, submission_id=submission_id)
    except MlflowException as error:
        raise click.ClickException(f"the MLflow server at {settings.mlflow_tracking_uri} failed "
                                   f"({str(error).splitlines()[0][:300]}); run the pipeline again once it answers: "
                                   "the stages that finished are reused") from None
    if as_json:
        click.echo(json.dumps({"pipeline": spec.name, "mlflow_run_id": outcome.run.run_id, "resumed": outcome.resumed,
                               "reused": outcome.reused, "outputs": outcome.outputs}))
        return
    table = Table("stage", "kind", "outputs", title=f"pipeline {spec.name}: done")
    for name in spec.order():
        note = " (reused)" if name in outcome.reused else ""
        table.add_row(name + note, spec.stages[name].uses, _short(outcome.outputs[name]))
    console.print(table)
    for name in spec.order():
        if "figures" in outcome.outputs[name]:
            console.print(_figures_table(f"stage {name}: {spec.data}", outcome.outputs[name]["figures"]))
    minutes, seconds = divmod(time.monotonic() - started, 60)
    console.print(f"MLflow run: {outcome.run.url}\nwall time: {minutes:.0f} min {seconds:.0f} s", highlight=False,
                  soft_wrap=True)


def _figures_table(title: str, figures: dict[str, dict[str, float]]) -> Table:
    """An evaluate stage's figures: what a person compares first."""
    first = next(iter(figures))
    table = Table("model", "top-1", "top-5", f"agrees with {first}", "latency b1 (ms)", "latency b32 (ms)",
                  "size (MB)", title=title)
    for label, values in figures.items():
        agreement = values.get("agreement")
        table.add_row(label, f"{values['top1']:.1%}", f"{values['top5']:.1%}",
                      "-" if agreement is None else f"{agreement:.1%}", f"{values['latency_ms']:.2f}",
                      f"{values['latency_b32_ms']:.1f}", f"{values['size_mb']:.1f}")
    return table


@pipeline.command("submit")
@spec_argument
@_data_option
@_from_option
@address_option
@click.option("--follow", is_flag=True, help="Print the driver's log until it ends; exit non-zero unless it succeeds.")
@queue_options
@home_option
@spec_errors
@submission_errors
@server_spec_errors
def submit(spec_path: Path, data: str | None, from_stage: str | None, address: str | None, follow: bool,
           priority: str | None, key: str | None, home: Path | None) -> None:
    """Submit the pipeline SPEC to the Ray cluster as a Ray job running `compound pipeline run` (through
    the compound server's queue when one is configured).

    Refused while a run of the same pipeline is active or queued. Watch it with `compound pipeline status
    NAME`, `compound job logs NAME` and in MLflow.
    """
    from pipelines.runner import check_data, check_models
    from pipelines.spec import check_from, load_pipeline_spec, with_data
    from pipelines.submit import plan_pipeline_submission

    spec = with_data(load_pipeline_spec(spec_path), data, str(spec_path))
    check_from(spec, from_stage)
    settings = settings_of(home)
    if through_server(settings, address=address, priority=priority, key=key):
        submit_through_server("pipeline", spec, settings, priority=priority, key=key, follow=follow,
                              from_stage=from_stage)
        return
    client = jobs_client(settings, address)
    check_data(spec, settings)
    check_models(spec, settings)
    plan = plan_pipeline_submission(spec, settings, client, options=("--from", from_stage) if from_stage else ())
    submit_and_print("pipeline", plan, settings, client, follow=follow)


@pipeline.command("status")
@click.argument("name", required=False)
@click.option("--limit", default=5, show_default=True, type=click.IntRange(min=1), help="Runs shown per pipeline.")
@json_option
@home_option
def status(name: str | None, limit: int, as_json: bool, home: Path | None) -> None:
    """The latest runs of pipeline NAME (or of every pipeline), each stage's status and outputs."""
    from mlflow.exceptions import MlflowException

    from pipelines.status import pipeline_runs

    settings = settings_of(home)
    try:
        runs = pipeline_runs(settings.mlflow_tracking_uri, name, limit=limit)
    except MlflowException as error:
        raise click.ClickException(f"cannot read the pipeline runs from MLflow at {settings.mlflow_tracking_uri}: "
                                   f"{str(error).splitlines()[0][:300]}") from None
    if as_json:
        click.echo(json.dumps(runs))
        return
    if not runs:
        console.print(f"no runs of {'pipeline ' + name if name else 'any pipeline'} yet")
        return
    for entry in runs:
        table = Table("stage", "status", "seconds", "outputs / error",
                      title=f"pipeline {entry['pipeline']}: run {entry['run_id']} {entry['status']} "
                            f"(started {local_time(entry['start_s'])}, data {entry['data']})")
        for stage, record in entry["stages"].items():
            seconds = f"{record['seconds']:.0f}" if record.get("seconds") is not None else "-"
            detail = record.get("error") or _short(record.get("outputs") or {})
            table.add_row(stage, record["status"], seconds, detail)
        console.print(table)
        console.print(f"MLflow: {entry['url']}", highlight=False, soft_wrap=True)


def _short(outputs: dict) -> str:
    """A stage's outputs on a line or two: ids and URIs in full, figures rounded."""
    parts = []
    for key, value in outputs.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict | list):
            value = json.dumps(value, separators=(",", ":"), ensure_ascii=False)[:120]
        parts.append(f"{key}={value}")
    return "\n".join(parts)
