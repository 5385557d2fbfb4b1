"""`compound model …`: inspect and export EfficientNet variants."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from jobs.cli.common import console

if TYPE_CHECKING:
    from effnet.weights import NumClassesMismatchError

ONNX_TOLERANCE = 1e-4  # exported logits may differ from PyTorch's by this much of the largest


@click.group()
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
    from effnet.export import export_onnx
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


def _num_classes_fix(error: NumClassesMismatchError, *, given: bool) -> str:
    """The library's error phrased with this command's flags."""
    asked = f"--num-classes {error.asked}" if given else f"the default {error.asked}"
    if error.compound:
        return (f"{error.path} is a compound checkpoint for {error.in_file} classes, not {asked}; "
                f"leave out --num-classes or pass --num-classes {error.in_file}")
    return f"{error.path} has a classifier for {error.in_file} classes, not {asked}; pass --num-classes {error.in_file}"


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
