"""`compound job …`: validate and run training jobs."""

from __future__ import annotations

import click


@click.group()
def job() -> None:
    """Training jobs: validate a spec, run it on the Ray cluster."""
