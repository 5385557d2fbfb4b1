"""What every command group shares: the console and the `--home` option."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

console = Console()


def home_option(function):
    return click.option(
        "--home", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="State dir of the local stack [default: $COMPOUND_HOME or ~/.compound].",
    )(function)
