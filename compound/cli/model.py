"""`compound model …`: inspect and export EfficientNet variants."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from compound.cli.common import console, home_option, settings_of

if TYPE_CHECKING:
    from cluster.evaluate import Evaluation
    from effnet.weights import NumClassesMismatchError

@click.group()
def model() -> None:
    """Inspect, export, quantize and evaluate models."""


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
@click.option("--num-classes", type=click.IntRange(min=1),
              help="Classifier size; default: a compound checkpoint's own, else 1000.")
@click.option("--resolution", type=click.IntRange(min=32), help="Input size; default: the variant's.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run the file in onnxruntime and compare with PyTorch.")
def export(variant: str, out_path: Path, weights: Path | None, num_classes: int | None, resolution: int | None,
           check: bool) -> None:
    """Export VARIANT (e.g. efficientnet_b0) to ONNX at a fixed input size.

    --weights may be a compound checkpoint or a torchvision/timm state dict, in safetensors or
    torch.save form under any suffix: the file's content decides which.
    """
    from effnet import build
    from effnet.export import ONNX_TOLERANCE, export_onnx, onnx_difference
    from effnet.weights import NumClassesMismatchError, load_weights

    try:
        if weights is None:
            net = build(variant) if num_classes is None else build(variant, num_classes=num_classes)
        else:
            net = load_weights(weights, variant, num_classes=num_classes)
    except NumClassesMismatchError as error:
        raise click.ClickException(_num_classes_fix(error, given=num_classes is not None)) from None
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    resolution = resolution or net.spec.resolution
    with console.status(f"exporting {net.spec.name} at {resolution}px"):
        path = export_onnx(net, out_path, resolution=resolution)
    console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if check:
        relative = onnx_difference(net, path, resolution=resolution)
        if relative is None:
            console.print("onnxruntime vs PyTorch: not compared, every logit is 0 (an untrained classifier); "
                          "export trained --weights to check the file")
            return
        console.print(f"onnxruntime vs PyTorch: max |Δlogit| = {relative:.1e} × largest |logit|")
        if relative > ONNX_TOLERANCE:
            path.unlink()
            raise click.ClickException(
                f"onnxruntime disagrees with PyTorch by {relative:.1e} of the largest logit (> {ONNX_TOLERANCE}); "
                f"{path} was removed"
            )


def _num_classes_fix(error: NumClassesMismatchError, *, given: bool) -> str:
    """The library's error phrased with this command's flags."""
    asked = f"--num-classes {error.asked}" if given else f"the default {error.asked}"
    if error.compound:
        return (f"{error.path} is a compound checkpoint for {error.in_file} classes, not {asked}; "
                f"leave out --num-classes or pass --num-classes {error.in_file}")
    return f"{error.path} has a classifier for {error.in_file} classes, not {asked}; pass --num-classes {error.in_file}"


@model.command("quantize")
@click.argument("source")
@click.option("--data", required=True, help="The dataset's manifest (s3://…/manifest.json): calibration on its "
                                            "train split, evaluation on its val split.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write model.fp32.onnx, model.int8.onnx and quantization.json into.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Largest top-1 loss of int8 against fp32, in percentage points.")
@click.option("--calibration-batches", type=click.IntRange(min=1), default=8, show_default=True,
              help="Batches of 32 training images to calibrate on.")
@click.option("--arch", help="The model, when SOURCE is a weights file that does not say.")
@click.option("--resolution", type=click.IntRange(min=16), help="Input size; default: what SOURCE trained at.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="ONNX Runtime threads.")
@click.option("--run", "run_id", help="An MLflow run to log the evaluation to.")
@home_option
def quantize(source: str, data: str, out_dir: Path, max_drop: float, calibration_batches: int, arch: str | None,
             resolution: int | None, threads: int, run_id: str | None, home: Path | None) -> None:
    """Export SOURCE to ONNX and quantize it to int8, keeping the accuracy within --max-drop.

    SOURCE: a job's checkpoint (s3://…), an MLflow model (models:/NAME@ALIAS, runs:/ID/model), or a
    weights file. Recipes are tried from the fastest (everything in int8) to the most careful (SiLU,
    squeeze-excite, stem and head in float); the first within the limit is kept. If none is, nothing
    is written and the command exits 1.
    """
    from cluster.data.manifest import ManifestError
    from cluster.quantize import QuantizationError
    from cluster.train.config import MODEL_NAMES
    from jobs.model_source import ModelRef, ModelSourceError
    from jobs.quantize import quantize_model
    from jobs.s3 import s3_access

    # What needs no stack is checked first: a mistake here is not hidden behind missing stack settings.
    remote = source.startswith(("s3://", "models:/", "runs:/"))
    if not remote and ("://" in source or not Path(source).expanduser().is_file()):
        raise click.BadParameter(f"{source}: no such file here; give an s3:// checkpoint or file, a models:/ or "
                                 "runs:/ MLflow URI, or a local weights file", param_hint="SOURCE")
    if arch is not None and arch not in MODEL_NAMES:
        raise click.BadParameter(f"{arch!r} is not a model compound builds; one of {', '.join(MODEL_NAMES)}",
                                 param_hint="--arch")
    _check_data(data)
    settings = settings_of(home)
    try:
        with console.status(f"quantizing {source}"):
            outcome = quantize_model(ModelRef(source, arch, resolution, "--arch"), data=data, out=out_dir,
                                     max_drop_points=max_drop, calibration_batches=calibration_batches,
                                     threads=threads, s3=s3_access(settings),
                                     tracking_uri=settings.mlflow_tracking_uri, run_id=run_id)
    except (ModelSourceError, ManifestError, QuantizationError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    for attempt in outcome.attempts:
        console.print(f"recipe {attempt.recipe}: " + (f"failed ({attempt.error})" if attempt.error else
                                                      f"top-1 {attempt.top1:.4f}, drop {attempt.drop_points:.2f} points"))
    console.print(f"kept recipe [bold]{outcome.recipe.name}[/]: {outcome.recipe.description}")
    _print_evaluations([outcome.fp32, outcome.int8])
    console.print(f"wrote {outcome.out}/")


@model.command("evaluate")
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", required=True, help="The dataset's manifest (s3://…/manifest.json).")
@click.option("--split", default="val", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="ONNX Runtime threads.")
@click.option("--run", "run_id", help="An MLflow run to log the figures and confusion matrices to.")
@home_option
def evaluate(models: tuple[Path, ...], data: str, split: str, threads: int, run_id: str | None,
             home: Path | None) -> None:
    """Top-1/top-5, agreement with the first model, latency p50/p95 at batch 1 and 32, and file size
    of each ONNX model in MODELS on a split of the shards."""
    from cluster.data.manifest import ManifestError
    from jobs.evaluate import evaluate_models
    from jobs.s3 import s3_access

    _check_data(data)
    settings = settings_of(home)
    try:
        with console.status(f"evaluating on {data} ({split})"):
            evaluations = evaluate_models(list(models), data=data, split=split, threads=threads,
                                          s3=s3_access(settings), tracking_uri=settings.mlflow_tracking_uri,
                                          run_id=run_id)
    except (ManifestError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    _print_evaluations(evaluations)


def _check_data(data: str) -> None:
    """--data names a dataset on S3 (checked before the stack's settings are read)."""
    from cluster.storage import split_s3_url

    try:
        split_s3_url(data)
    except ValueError:
        raise click.BadParameter(f"{data!r} is not an S3 location; give the dataset's s3://…/manifest.json",
                                 param_hint="--data") from None


def _print_evaluations(evaluations: list[Evaluation]) -> None:
    table = Table("model", "images", "top-1", "top-5", "agreement", "b1 p50/p95 ms", "b32 p50/p95 ms", "MB",
                  title=f"ONNX Runtime, {evaluations[0].threads} threads")
    for e in evaluations:
        b1, b32 = e.latency_ms[1], e.latency_ms[32]
        table.add_row(Path(e.path).name, str(e.samples), f"{e.top1:.4f}", f"{e.top5:.4f}",
                      "—" if e.agreement is None else f"{e.agreement:.4f}", f"{b1['p50']:.1f} / {b1['p95']:.1f}",
                      f"{b32['p50']:.1f} / {b32['p95']:.1f}", f"{e.size_mb:.1f}")
    console.print(table)
