"""The `compound` command line: one module per command group, each a thin wrapper that parses input
once and calls the packages. Group names follow Ray's `ray job …` convention."""

from __future__ import annotations

import logging
import sys

import click

from compound.cli.data import data
from compound.cli.job import job
from compound.cli.model import model
from compound.cli.pipeline import pipeline
from compound.cli.registry import registry
from compound.cli.schedule import schedule
from compound.cli.stack import down, stack, up
from compound.cli.sweep import sweep

OUR_PACKAGES = ("effnet", "cluster", "pipelines", "jobs", "infra", "compound")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """compound: distributed training of the EfficientNet family on Ray, MLflow and S3."""
    # Our packages talk at INFO; third-party libraries only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)


for command in (up, down, stack, data, model, job, sweep, pipeline, registry, schedule):
    cli.add_command(command)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
