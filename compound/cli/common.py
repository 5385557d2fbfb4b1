"""What every command group shares: the console, the `--home` option, errors that end a command cleanly."""

from __future__ import annotations

import functools
from pathlib import Path

import click
from rich.console import Console

console = Console()


def home_option(function):
    return click.option(
        "--home", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="State dir of the local stack [default: $COMPOUND_HOME or ~/.compound].",
    )(function)


def exits_cleanly_on(*errors: str):
    """The exceptions named ("module.Class", subclasses included) end the command with their message and
    exit 1, not a traceback. Named, not imported: a command's heavy modules load only when it runs."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except Exception as error:
                if not any(f"{kind.__module__}.{kind.__qualname__}" in errors for kind in type(error).__mro__):
                    raise
                raise click.ClickException(str(error)) from None
        return wrapper
    return decorate
