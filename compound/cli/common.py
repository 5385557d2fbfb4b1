"""What the command groups share: the console, options and arguments, settings, errors that end a command
cleanly, and following a submission."""

from __future__ import annotations

import datetime
import functools
import sys
import time
from pathlib import Path

import click
from rich.console import Console

console = Console()
SPEC_ERROR_EXIT = 2
RUN_WAIT_S = 60.0


def home_option(function):
    return click.option(
        "--home", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="State dir of the local stack [default: $COMPOUND_HOME or ~/.compound].",
    )(function)


def _named(error: Exception, names: tuple[str, ...]) -> bool:
    """Whether the error is of a class named "module.Class" (subclasses included)."""
    return any(f"{kind.__module__}.{kind.__qualname__}" in names for kind in type(error).__mro__)


def _fail(error: Exception) -> None:
    raise click.ClickException(str(error)) from None


def exits_cleanly_on(*errors: str, end=_fail):
    """The exceptions named ("module.Class", subclasses included) end the command by `end` (default: their
    message and exit 1), not a traceback. Named, not imported: a command's heavy modules load only when it runs."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as error:
                if not any(_named(link, errors) for link in _chain(error)):
                    raise
                end(error)
        return wrapper
    return decorate


submission_errors = exits_cleanly_on("jobs.submit.SubmissionError")
def _chain(error: BaseException):
    """The error and what it was raised from: a pipeline's stage failure carries its job's."""
    while error is not None:
        yield error
        error = error.__cause__


def _fail_for_now(error: Exception) -> None:
    """The cluster or a service failed the driver: exit 75 (`jobs.submit.INFRASTRUCTURE_EXIT`), which the
    compound server retries."""
    from jobs.submit import INFRASTRUCTURE_EXIT

    click.ClickException(str(error)).show()
    sys.exit(INFRASTRUCTURE_EXIT)


# What a driver (`job|sweep|pipeline run`) ends with when the job fails (exit 1) or the cluster or the
# services do (exit 75: the server submits the driver again).
def driver_errors(function):
    failed = exits_cleanly_on("infra.settings.ConfigError", "jobs.driver.JobFailedError", "jobs.sweep.SweepFailedError",
                              "pipelines.runner.StageFailedError", "jobs.lease.LeaseHeld")
    unavailable = exits_cleanly_on("jobs.driver.ClusterUnreachableError", "jobs.driver.ClusterFailedError",
                                   "jobs.tracking.TrackingUnavailableError", end=_fail_for_now)
    return failed(unavailable(function))


def log_kept(function):
    """A submitted driver (`--submission-id`) keeps its whole output on S3 as well as in Ray's job log,
    errors included (`jobs.driver_log`): `compound job logs` reads it there once Ray forgets the job."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from infra.settings import ConfigError, load_settings
        from jobs.driver_log import kept_on_s3
        from jobs.s3 import s3_access

        submission_id = kwargs.get("submission_id")
        try:
            settings = load_settings(kwargs.get("home")) if submission_id else None
        except ConfigError:
            settings = None  # the command says so itself
        if settings is None:
            return function(*args, **kwargs)
        with kept_on_s3(s3_access(settings), settings.checkpoints_bucket, submission_id):
            try:
                return function(*args, **kwargs)
            except click.ClickException as error:  # printed here, so that the kept log has it too
                error.show()
                sys.exit(error.exit_code)
    return wrapper


def fail_on_spec_error(error: Exception) -> None:
    """Print a spec's problems and exit 2: nothing was started."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
    sys.exit(SPEC_ERROR_EXIT)


# A spec's problems (`jobs.spec.SpecError`) end the command with exit 2: nothing was started.
spec_errors = exits_cleanly_on("jobs.spec.SpecError", end=fail_on_spec_error)


def _spec_refused(error: Exception) -> None:
    """A spec the server refused (422: its problems) exits 2, as one refused here does; else exit 1."""
    if getattr(error, "status", None) == 422:
        fail_on_spec_error(error)
    _fail(error)


# The server refused or failed a request, or does not answer: its message and exit 1.
server_errors = exits_cleanly_on("server.client.ServerError")
# The same for commands that send the server a spec (submit, schedule): its problems exit 2.
server_spec_errors = exits_cleanly_on("server.client.ServerError", end=_spec_refused)


def server_of(home: Path | None):
    """The compound server the stack's settings name, as its client."""
    from server.client import ServerClient

    return ServerClient.of(settings_of(home))


def spec_argument(function):
    return click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))(function)


def address_option(function):
    return click.option("--address", default=None, metavar="URL",
                        help="The Ray dashboard (job server) [default: the stack's, or $COMPOUND_RAY_DASHBOARD_URL].",
                        )(function)


def json_option(function):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")(function)


def settings_of(home: Path | None):
    """The stack's settings; a missing or broken settings file ends the command with what to do."""
    from infra.settings import ConfigError, load_settings

    try:
        return load_settings(home)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


def jobs_client(settings, address: str | None):
    from jobs.submit import JobsClient

    return JobsClient(address or settings.ray_dashboard_url, settings.ray_token)


def read_spec(spec_ref: str, home: Path | None, *, from_file, from_text):
    """The spec a driver runs — a file, or an s3:// URI where `submit` put it — and the stack's settings.
    A file is checked before the settings are read: a bad one fails the same with no stack."""
    spec = None if spec_ref.startswith("s3://") else from_file(Path(spec_ref))
    settings = settings_of(home)
    if spec is None:
        from jobs.submit import read_spec_text  # it loads Ray: after the settings have logged the process in

        spec = from_text(read_spec_text(spec_ref, settings), spec_ref)
    return spec, settings


def print_dry_run(what: str, plan, client) -> None:
    console.print(f"[green]ok:[/green] {what} {plan.spec.name} can be submitted to {client.address}; nothing was "
                  f"submitted (--dry-run)\nentrypoint: {plan.entrypoint}", highlight=False, soft_wrap=True)


def submit_and_print(what: str, plan, settings, client, *, follow: bool) -> None:
    """Submit the plan and print its id and dashboard link; with `follow`, its log until it ends."""
    from jobs.submit import submit

    submit(plan, settings, client)
    console.print(f"submitted {what} {plan.spec.name} as [bold]{plan.submission_id}[/bold]\n"
                  f"Ray dashboard: {client.dashboard_url(plan.submission_id)}", highlight=False, soft_wrap=True)
    if follow:
        follow_submission(settings, client, plan.submission_id)


def run_of(settings, submission):
    """The MLflow run of a submission's job (None until its driver has opened it)."""
    from jobs.tracking import find_run

    return find_run(settings.mlflow_tracking_uri, experiment=submission.experiment or submission.job,
                    job_name=submission.job)


def wait_for_run(settings, client, submission_id: str):
    """The job's MLflow run, once its driver has opened it (None if the job ends or a minute passes first)."""
    deadline = time.monotonic() + RUN_WAIT_S
    while time.monotonic() < deadline:
        submission = client.find(submission_id)
        run = run_of(settings, submission)
        if run is not None or not submission.active:
            return run
        time.sleep(1.0)
    return None


def follow_submission(settings, client, submission_id: str) -> None:
    """Print the log until the job ends, then the MLflow run's link; exit 1 unless the job succeeded."""
    ended = client.follow(submission_id, lambda text: click.echo(text, nl=False))
    style = "green" if ended.status == "SUCCEEDED" else "red"
    console.print(f"submission {submission_id}: [{style}]{ended.status}[/{style}] {ended.message}", highlight=False,
                  soft_wrap=True)
    run = run_of(settings, ended)
    if run is not None:
        console.print(f"MLflow run: {run.url}", highlight=False, soft_wrap=True)
    if ended.status != "SUCCEEDED":
        sys.exit(1)


def local_time(seconds: float | None) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"
