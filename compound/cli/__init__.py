"""The `compound` command line: one module per command group, each a thin wrapper that parses input
once and calls the packages. Group names follow Ray's `ray job …` convention."""

from __future__ import annotations

import contextlib
import logging
import sys

import click

from compound.cli.data import data
from compound.cli.job import job
from compound.cli.model import model
from compound.cli.pipeline import pipeline
from compound.cli.queue import queue
from compound.cli.registry import registry
from compound.cli.schedule import schedule
from compound.cli.stack import down, stack, up
from compound.cli.sweep import sweep
from compound.cli.user import audit, user

OUR_PACKAGES = ("effnet", "cluster", "pipelines", "jobs", "infra", "server", "compound")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """compound: distributed training of the EfficientNet family on Ray, MLflow and S3."""
    # Our packages talk at INFO; third-party libraries only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)


for command in (up, down, stack, data, model, job, sweep, pipeline, queue, registry, schedule, user, audit):
    cli.add_command(command)


def main() -> None:
    _log_in(sys.argv[1:])
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


def _log_in(args: list[str]) -> None:
    """Put the stack's logins (MLflow, Ray) into this process's environment before any command runs: Ray
    reads whether its cluster wants a token once, when it is first imported, and a command may import it
    before it reads the settings. The state dir is the command's --home, else the default one; a command
    that finds no settings says so itself."""
    from pathlib import Path

    from infra.settings import ConfigError, load_settings

    home = next((a.split("=", 1)[1] for a in args if a.startswith("--home=")), None)
    if home is None and "--home" in args[:-1]:
        home = args[args.index("--home") + 1]
    with contextlib.suppress(ConfigError):
        load_settings(Path(home) if home else None)
