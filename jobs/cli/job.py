"""`compound job …`: validate a training job spec, run it on the Ray cluster."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.table import Table

from jobs.cli.common import console, home_option

SPEC_ERROR_EXIT = 2
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
    """Training jobs: validate a spec, run it on the Ray cluster."""


def _spec_argument(function):
    return click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))(function)


def _fail_on_spec_error(error: Exception) -> None:
    """Print a spec's problems and exit 2: nothing was started."""
    console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    sys.exit(SPEC_ERROR_EXIT)


@job.command("validate")
@_spec_argument
@click.option("--offline", is_flag=True, help="Check the spec alone, not its datasets and storage on S3.")
@home_option
def validate(spec_path: Path, offline: bool, home: Path | None) -> None:
    """Print SPEC resolved, with every default; or what is wrong with it (exit 2)."""
    from infra.settings import ConfigError, load_settings
    from jobs.driver import prepare_job
    from jobs.spec import SpecError, dump_spec, load_job_spec

    try:
        spec = load_job_spec(spec_path)
        if not offline:
            spec = prepare_job(spec, load_settings(home), source=str(spec_path)).spec
    except SpecError as error:
        _fail_on_spec_error(error)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    console.print(dump_spec(spec), highlight=False, markup=False, end="")


@job.command("run")
@_spec_argument
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON (for scripts).")
@home_option
def run(spec_path: Path, as_json: bool, home: Path | None) -> None:
    """Run SPEC on the configured Ray cluster and wait for it (the driver a submitted job runs).

    Run again after an interruption, the same job resumes from its latest checkpoint.
    """
    from infra.settings import ConfigError, load_settings
    from jobs.driver import ClusterUnreachableError, JobFailedError, run_job
    from jobs.spec import SpecError, load_job_spec

    try:
        spec = load_job_spec(spec_path)
        outcome = run_job(spec, load_settings(home), source=str(spec_path))
    except SpecError as error:
        _fail_on_spec_error(error)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    except (JobFailedError, ClusterUnreachableError) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps({"job": outcome.spec.name, "checkpoint": outcome.checkpoint,
                               "resumed": outcome.resumed, "epochs": outcome.history}))
        return
    table = Table(*(label for label, _ in EPOCH_COLUMNS), title=f"job {outcome.spec.name}: done")
    for epoch in outcome.history:
        table.add_row(*(fmt(epoch[key]) if key in epoch else "-" for (_, (key, fmt)) in EPOCH_COLUMNS))
    console.print(table)
    console.print(f"checkpoint: {outcome.checkpoint or '-'}", highlight=False, soft_wrap=True)
