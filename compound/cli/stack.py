"""`compound up | down | stack status`: the local stack."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from compound.cli.common import console, home_option


@click.command()
@home_option
@click.option("--s3-port", type=click.IntRange(1, 65535), help="S3 API port [default 8333, or as last time].")
@click.option("--mlflow-port", type=click.IntRange(1, 65535), help="MLflow server port [default 5000].")
@click.option("--ray-port", type=click.IntRange(1, 65535), help="Ray GCS port [default 6379].")
@click.option("--dashboard-port", type=click.IntRange(1, 65535), help="Ray dashboard and job server port [default 8265].")
def up(home: Path | None, s3_port: int | None, mlflow_port: int | None, ray_port: int | None,
       dashboard_port: int | None) -> None:
    """Start the local stack: S3 store, MLflow server, Ray head and pipeline scheduler, on 127.0.0.1."""
    from infra.settings import compound_home
    from infra.stack import Stack, StackError, StackPorts

    stack = Stack(home or compound_home())
    chosen = {"s3": s3_port, "mlflow": mlflow_port, "ray": ray_port, "ray_dashboard": dashboard_port}
    chosen = {name: port for name, port in chosen.items() if port is not None}
    ports = (stack.saved_ports() or StackPorts()).model_copy(update=chosen)
    try:
        with console.status("starting the stack (S3, MLflow, Ray)"):
            settings, started = stack.up(ports)
    except StackError as error:
        raise click.ClickException(str(error)) from None
    console.print(f"started: {', '.join(started)}" if started else "already running: nothing started")
    _print_endpoints(settings, stack.home)
    if stack.new_mlflow_login:  # shown this once; it stays in the settings file
        console.print(f"MLflow UI login (shown once): user [bold]{settings.mlflow_username}[/bold], password "
                      f"[bold]{settings.mlflow_password.get_secret_value()}[/bold] (`champion` moves only for "
                      f"{settings.mlflow_promoter_username}, the promoter: `compound registry promote`)",
                      highlight=False, soft_wrap=True)


@click.command()
@home_option
def down(home: Path | None) -> None:
    """Stop the local stack's services started by `compound up` (data is kept)."""
    from infra.settings import compound_home
    from infra.stack import Stack

    with console.status("stopping the stack"):
        stopped = Stack(home or compound_home()).down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@click.group()
def stack() -> None:
    """The local stack."""


@stack.command("status")
@home_option
def stack_status(home: Path | None) -> None:
    """Which services run and answer their health check; exits 1 unless all do."""
    from infra.settings import ConfigError, compound_home, load_settings
    from infra.stack import Stack

    stack_ = Stack(home or compound_home())
    table = Table("service", "pid", "healthy", "log")
    statuses = stack_.status()
    for status in statuses:
        table.add_row(status.name, str(status.pid or "-"), "yes" if status.healthy else "no", str(status.log_file))
    console.print(table)
    try:
        _print_endpoints(load_settings(stack_.home), stack_.home)
    except ConfigError:
        pass
    if not all(s.healthy for s in statuses):
        sys.exit(1)


def _print_endpoints(settings, home: Path) -> None:
    from infra.settings import default_scheduler_store

    table = Table("endpoint", "address", show_header=False)
    table.add_row("S3 API", settings.s3_endpoint)
    table.add_row("MLflow UI", settings.mlflow_tracking_uri)
    table.add_row("Ray dashboard", settings.ray_dashboard_url)
    table.add_row("Ray address", settings.ray_address)
    table.add_row("schedules", _without_password(settings.scheduler_store or default_scheduler_store(home)))
    if settings.mlflow_username:
        table.add_row("MLflow login", f"{settings.mlflow_username}, password in {home / 'settings.json'}")
    table.add_row("settings", str(home / "settings.json"))
    console.print(table)


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
