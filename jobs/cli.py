"""The `compound` command line: thin wrappers that parse input once and call the packages."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

console = Console()
OUR_PACKAGES = ("effnet", "cluster", "pipelines", "jobs", "infra")
ONNX_TOLERANCE = 1e-4  # exported logits may differ from PyTorch's by this much of the largest


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """compound: distributed training of the EfficientNet family on Ray, MLflow and S3."""
    # Our packages talk at INFO; third-party libraries only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)


def _home_option(function):
    return click.option(
        "--home", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="State dir of the local stack [default: $COMPOUND_HOME or ~/.compound].",
    )(function)


@cli.command()
@_home_option
@click.option("--s3-port", type=click.IntRange(1, 65535), help="S3 API port [default 8333, or as last time].")
@click.option("--mlflow-port", type=click.IntRange(1, 65535), help="MLflow server port [default 5000].")
@click.option("--ray-port", type=click.IntRange(1, 65535), help="Ray GCS port [default 6379].")
@click.option("--dashboard-port", type=click.IntRange(1, 65535), help="Ray dashboard and job server port [default 8265].")
def up(home: Path | None, s3_port: int | None, mlflow_port: int | None, ray_port: int | None,
       dashboard_port: int | None) -> None:
    """Start the local stack: S3 store, MLflow server and Ray head, on 127.0.0.1."""
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


@cli.command()
@_home_option
def down(home: Path | None) -> None:
    """Stop the local stack's services started by `compound up` (data is kept)."""
    from infra.settings import compound_home
    from infra.stack import Stack

    with console.status("stopping the stack"):
        stopped = Stack(home or compound_home()).down()
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")


@cli.group()
def stack() -> None:
    """The local stack."""


@stack.command("status")
@_home_option
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
    table = Table("endpoint", "address", show_header=False)
    table.add_row("S3 API", settings.s3_endpoint)
    table.add_row("MLflow UI", settings.mlflow_tracking_uri)
    table.add_row("Ray dashboard", settings.ray_dashboard_url)
    table.add_row("Ray address", settings.ray_address)
    table.add_row("settings", str(home / "settings.json"))
    console.print(table)


@cli.group()
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
@_home_option
def data_shards(source: str, dest: str, image_size: int, val_fraction: float, seed: int, shard_mb: float,
                overwrite: bool, home: Path | None) -> None:
    """Write SOURCE as WebDataset shards and a manifest under DEST (s3://bucket/prefix/).

    SOURCE is `sklearn:digits` (the embedded demo data), an image folder with one sub-folder per
    class, or existing WebDataset tars (a .tar path, a glob, or a comma-separated list).
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from cluster.data.sources import open_source
    from cluster.data.writer import write_shards
    from infra.settings import ConfigError, load_settings

    try:
        settings = load_settings(home)
        dataset = open_source(source, image_size=image_size, val_fraction=val_fraction, seed=seed)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} samples"),
                      TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(f"sharding {dataset.name}")
            manifest, url = write_shards(
                dataset, dest, settings=settings, shard_bytes=int(shard_mb * 2**20), overwrite=overwrite,
                on_sample=lambda: progress.advance(task),
            )
    except (ValueError, ConfigError, FileExistsError) as error:
        raise click.ClickException(str(error)) from None
    for name, split in manifest.splits.items():
        console.print(f"{name}: {split.samples} samples in {len(split.shards)} shards")
    if dataset.skipped:
        console.print(f"skipped {len(dataset.skipped)} undecodable or unlabelled images (see the log)")
    console.print(f"manifest: {url}")


@cli.group()
def model() -> None:
    """Inspect and export EfficientNet variants."""


@model.command("list")
def list_models() -> None:
    """The variants with their scaling coefficients and sizes."""
    from effnet import VARIANTS

    table = Table("variant", "width", "depth", "resolution", "dropout", "parameters (1000 classes)")
    for spec in VARIANTS.values():
        table.add_row(
            spec.name, f"{spec.width_mult:.1f}", f"{spec.depth_mult:.1f}", str(spec.resolution),
            f"{spec.dropout:.1f}", f"{spec.num_params:,}",
        )
    console.print(table)


@model.command("export")
@click.argument("variant")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the .onnx file.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A compound checkpoint, or a torchvision/timm state dict for VARIANT.")
@click.option("--num-classes", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--resolution", type=click.IntRange(min=32), help="Input size; default: the variant's.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the file in onnxruntime and compare with PyTorch.")
def export(variant: str, out_path: Path, weights: Path | None, num_classes: int, resolution: int | None,
           check: bool) -> None:
    """Export VARIANT (e.g. efficientnet_b0) to ONNX at a fixed input size."""
    from effnet import build
    from effnet.export import export_onnx
    from effnet.weights import load_checkpoint, load_reference_weights

    try:
        if weights is not None and weights.suffix == ".safetensors":
            net = load_checkpoint(weights)
            if net.spec.name != variant:
                raise ValueError(f"{weights} holds {net.spec.name}, not {variant}")
        else:
            net = build(variant, num_classes=num_classes)
            if weights is not None:
                load_reference_weights(net, weights)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    resolution = resolution or net.spec.resolution
    with console.status(f"exporting {net.spec.name} at {resolution}px"):
        path = export_onnx(net, out_path, resolution=resolution)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if check:
        difference, largest = _onnxruntime_difference(net, path, resolution)
        # Relative to the largest logit: untrained weights give logits near 1e-14, where any
        # absolute bound would pass whatever the file computes.
        relative = difference / largest if largest else difference
        console.print(f"onnxruntime vs PyTorch: max |Δlogit| {difference:.1e} = {relative:.1e} × largest |logit|")
        if relative > ONNX_TOLERANCE:
            path.unlink()
            raise click.ClickException(
                f"onnxruntime disagrees with PyTorch by {relative:.1e} of the largest logit (> {ONNX_TOLERANCE}); "
                f"{path} was removed"
            )


def _onnxruntime_difference(net, path: Path, resolution: int) -> tuple[float, float]:
    import onnxruntime
    import torch

    from effnet.export import INPUT_NAME
    from effnet.specs import IMAGE_CHANNELS

    images = torch.randn(1, IMAGE_CHANNELS, resolution, resolution)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {INPUT_NAME: images.numpy()})
    with torch.no_grad():
        torch_logits = net.eval()(images)
    return (torch.from_numpy(onnx_logits) - torch_logits).abs().max().item(), torch_logits.abs().max().item()


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
