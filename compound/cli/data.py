"""`compound data …`: datasets as WebDataset shards on S3."""

from __future__ import annotations

from pathlib import Path

import click

from compound.cli.common import console, home_option


@click.group()
def data() -> None:
    """Datasets as WebDataset shards on S3."""


@data.command("shards")
@click.argument("source")
@click.argument("dest")
@click.option("--image-size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Side of the RGB images made from the 8x8 digits (sklearn:digits only).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/val split.")
@click.option("--shard-size", "shard_mb", type=click.FloatRange(min=0.001), default=64.0, show_default=True,
              help="Target shard size in MB.")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already at DEST.")
@click.option("--if-missing", is_flag=True,
              help="Keep a dataset already at DEST and write nothing (jobs that trained on it can resume).")
@home_option
def data_shards(source: str, dest: str, image_size: int, val_fraction: float, seed: int, shard_mb: float,
                overwrite: bool, if_missing: bool, home: Path | None) -> None:
    """Write SOURCE as WebDataset shards and a manifest under DEST (s3://bucket/prefix/).

    SOURCE is `sklearn:digits` (the embedded demo data), an image folder with one sub-folder per
    class, or existing WebDataset tars (a .tar path, a glob, or a comma-separated list).
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from cluster.data.manifest import ManifestError, load_manifest
    from cluster.data.sources import open_source
    from cluster.data.writer import write_shards
    from cluster.storage import split_s3_url
    from infra.settings import ConfigError, load_settings
    from jobs.s3 import s3_access

    if overwrite and if_missing:
        raise click.UsageError("--overwrite and --if-missing contradict each other; pass one")
    # What needs no stack is checked first: a mistake here is not hidden behind missing stack settings.
    try:
        split_s3_url(dest)
    except ValueError:
        raise click.BadParameter(f"{dest!r} is not an S3 location; give s3://bucket/prefix/", param_hint="DEST") from None
    opened = None
    try:
        if if_missing:  # the source is read only if the dataset is not there: a cheap look now
            _check_source_exists(source)
        else:
            opened = open_source(source, image_size=image_size, val_fraction=val_fraction, seed=seed)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="SOURCE") from None
    try:
        settings = load_settings(home)
        if if_missing:
            try:
                manifest, identity = load_manifest(dest, s3=s3_access(settings))
            except ManifestError:
                pass
            else:
                console.print(f"kept the dataset at {dest} ({manifest.source}, id {identity[:12]}…)")
                return
        dataset = opened if opened is not None else open_source(source, image_size=image_size, val_fraction=val_fraction, seed=seed)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} samples"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(f"sharding {dataset.name}")
            written = write_shards(
                dataset, dest, s3=s3_access(settings), shard_bytes=int(shard_mb * 2**20), overwrite=overwrite,
                on_sample=lambda: progress.advance(task),
            )
    except (ValueError, ConfigError, FileExistsError) as error:
        raise click.ClickException(str(error)) from None
    for name, split in written.manifest.splits.items():
        console.print(f"{name}: {split.samples} samples in {len(split.shards)} shards")
    if written.skipped:
        console.print(f"skipped {len(written.skipped)} undecodable or unlabelled images (see the log)")
    console.print(f"manifest: {written.url}")


def _check_source_exists(source: str) -> None:
    """`ValueError` if SOURCE names local files or folders and one is not there."""
    import glob

    from cluster.data.sources import DIGITS_SOURCE

    if source == DIGITS_SOURCE:
        return
    missing = [part for part in source.split(",") if not glob.glob(str(Path(part).expanduser()))]
    if missing:
        raise ValueError(f"nothing at {', '.join(missing)}")
