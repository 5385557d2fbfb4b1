"""int8 static quantization of an ONNX classifier with ONNX Runtime (QDQ, per-channel weights), calibrated
on real batches, kept only within an accuracy limit.

EfficientNet loses accuracy in int8 (reported drops of 15–30 points): its activations have long
tails, and per-tensor activation scales spend most of 8 bits on them. Measured on a B0 trained here
(digits, 224 px): min-max ranges over 256 calibration images cost 72 top-1 points, over 64 images 8;
ORT's default percentile (99.999) 3.5; clipping at the 99.99th percentile 0.3–0.8 (two calibration
samples). So the ladder starts with everything in int8 at 99.99 (also the fastest: every op, SiLU
included, runs as an int8 kernel; an op left in float costs a dequantize, a quantize and a layout
change around it, and ORT runs SiLU in float slower than the int8 convolutions save) and goes on to
other calibrations, then to float islands. `quantize` keeps the first recipe whose top-1 drop on the
evaluation batches is within the limit.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

Batches = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (images, labels, weights)
CALIBRATION_MEMORY_BYTES = 6 * 2**30  # what ORT's calibration may hold


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    op_types: tuple[str, ...] | None  # what is quantized; None: every op ORT can
    calibration: str  # an onnxruntime CalibrationMethod name
    percentile: float = 99.999  # where Percentile calibration clips each tensor's range
    keep_float: Callable[[object], list[str]] = lambda graph: []  # nodes excluded by name
    # uint8: ORT's x86 int8 kernels are built for U8S8 (signed int8 activations ran 2.5x slower here)
    activations: str = "QUInt8"


def _stem(graph) -> list[str]:
    """The first convolution and the SiLU after it: the layer that sees the image."""
    convs = [node for node in graph.node if node.op_type == "Conv"]
    if not convs:
        return []
    return [convs[0].name] + [node.name for node in graph.node if convs[0].output[0] in node.input]


def _stem_and_head(graph) -> list[str]:
    """The first and last convolutions: the image's and the classifier's neighbours."""
    convs = [node.name for node in graph.node if node.op_type == "Conv"]
    return [convs[0], convs[-1]] if convs else []


RECIPES = (
    Recipe("int8-all", "every op in int8 (SiLU and squeeze-excite included); percentile 99.99 calibration", None,
           "Percentile", percentile=99.99),
    Recipe("int8-stem-float", "as int8-all, with the stem convolution and its SiLU in float", None, "Percentile",
           percentile=99.99, keep_float=_stem),
    Recipe("int8-all-percentile", "every op in int8; percentile 99.999 calibration", None, "Percentile"),
    Recipe("int8-all-minmax", "every op in int8; min-max calibration", None, "MinMax"),
    Recipe("conv-inner-percentile", "inner convolutions in int8; SiLU, squeeze-excite, stem, head and classifier "
           "in float (slower than fp32: for size); percentile calibration", ("Conv",), "Percentile",
           keep_float=_stem_and_head),
    # The last resort keeps the accuracy and the int8 weights' size, not the speed: ORT runs 16-bit
    # activations through float kernels (several times slower than fp32 here).
    Recipe("int8-weights-int16-activations", "int8 weights, 16-bit activations: for size, not speed",
           None, "MinMax", activations="QUInt16"),
)


@dataclass(frozen=True)
class Attempt:
    recipe: str
    top1: float
    drop_points: float  # fp32 top-1 − int8 top-1, in percentage points (inf: the recipe failed)
    error: str | None = None  # why ONNX Runtime could not apply the recipe


@dataclass(frozen=True)
class Quantized:
    """The recipe kept, every attempt, and both models' logits on the evaluation batches (padding
    included, as `cluster.evaluate.predict` returns them): an evaluation need not predict again."""

    recipe: Recipe
    attempts: list[Attempt]
    fp32_logits: np.ndarray
    int8_logits: np.ndarray


class QuantizationError(RuntimeError):
    """No recipe kept the accuracy drop within the limit; nothing was written."""


def top1(logits: np.ndarray, batches: Batches) -> float:
    labels = np.concatenate([labels for _, labels, _ in batches])
    real = np.concatenate([weights for _, _, weights in batches]) > 0
    return float((logits.argmax(axis=1)[real] == labels[real]).mean())


def quantize(fp32: Path, out: Path, *, calibration: Batches, evaluation: Batches, max_drop_points: float,
             threads: int, recipes: tuple[Recipe, ...] = RECIPES) -> Quantized:
    """Write the int8 model of `fp32` to `out` with the first recipe within `max_drop_points` of fp32's
    top-1 on `evaluation`. Raises QuantizationError (nothing written) if none is."""
    from cluster.evaluate import predict

    fp32_logits = predict(fp32, evaluation, threads)
    reference = top1(fp32_logits, evaluation)
    attempts = []
    with tempfile.TemporaryDirectory(prefix="compound-quantize-", dir=out.parent) as directory:
        prepared = Path(directory) / "prepared.onnx"
        _prepare(fp32, prepared)
        for recipe in recipes:
            candidate = Path(directory) / f"{recipe.name}.onnx"
            try:
                _quantize(prepared, candidate, recipe, calibration)
            except (ValueError, RuntimeError) as error:  # e.g. a histogram over a constant tensor
                log.warning("recipe %s failed: %s", recipe.name, str(error).splitlines()[0][:300])
                attempts.append(Attempt(recipe.name, float("nan"), float("inf"), str(error).splitlines()[0][:300]))
                continue
            logits = predict(candidate, evaluation, threads)
            score = top1(logits, evaluation)
            attempt = Attempt(recipe.name, score, (reference - score) * 100)
            attempts.append(attempt)
            log.info("recipe %s: top-1 %.4f (fp32 %.4f), drop %.2f points", recipe.name, score, reference,
                     attempt.drop_points)
            if attempt.drop_points <= max_drop_points:
                os.replace(candidate, out)
                return Quantized(recipe, attempts, fp32_logits, logits)
    tried = "; ".join(f"{a.recipe} drops {a.drop_points:.2f}" for a in attempts)
    raise QuantizationError(f"no recipe kept top-1 within {max_drop_points} points of fp32's {reference:.4f} "
                            f"({tried}); nothing was written. Raise --max-drop, or calibrate on more batches")


def _prepare(fp32: Path, prepared: Path) -> None:
    """ORT's pre-processing: shapes inferred and the graph optimised, as quantization expects."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=False)


def _quantize(prepared: Path, out: Path, recipe: Recipe, calibration: Batches) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(prepared)).graph
    extra = {"UseQDQContribOps": recipe.activations == "QUInt16",  # 16-bit Q/DQ are contrib ops
             "CalibPercentile": recipe.percentile}
    # ORT's calibrators hold every intermediate output of every calibration image at once (a B0 at 224 px:
    # 87 MB an image); their CalibMaxIntermediateOutputs drops data without merging it in ORT 1.31.
    calibration = _within(calibration, CALIBRATION_MEMORY_BYTES // max(1, _activation_bytes_per_image(graph)))
    quantize_static(
        str(prepared), str(out), _Reader(calibration, graph.input[0].name), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(recipe.op_types) if recipe.op_types else None, per_channel=True,
        activation_type=QuantType[recipe.activations], weight_type=QuantType.QInt8,
        nodes_to_exclude=recipe.keep_float(graph), calibrate_method=CalibrationMethod[recipe.calibration],
        extra_options=extra,
    )


def _activation_bytes_per_image(graph) -> int:
    """fp32 bytes of every intermediate tensor for one image, from the shapes ORT's pre-processing inferred."""
    total = 0
    for value in graph.value_info:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim[1:]]
        if dims and all(dims):
            total += 4 * math.prod(dims)
    return total


def _within(batches: Batches, images: int) -> Batches:
    """Whole batches holding at most `images` images, or part of the first (ORT's histograms need one shape)."""
    size = len(batches[0][0])
    kept = batches[:images // size] or [tuple(part[:max(1, images)] for part in batches[0])]
    if len(kept) < len(batches) or len(kept[0][0]) < size:
        log.info("calibrating on %d of the %d calibration images (memory)", sum(len(b[0]) for b in kept),
                 sum(len(b[0]) for b in batches))
    return kept


class _Reader:
    """ONNX Runtime's calibration data reader over in-memory batches (padding included: it is real images)."""

    def __init__(self, batches: Batches, input_name: str) -> None:
        self.batches, self.input_name = batches, input_name
        self._iterator: Iterator | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iterator is None:
            self._iterator = iter(self.batches)
        images = next(self._iterator, None)
        return None if images is None else {self.input_name: images[0]}

    def rewind(self) -> None:
        self._iterator = None


def write_atomically(files: dict[str, Path], directory: Path) -> None:
    """Move `files` (name → temporary path) into `directory` so it appears whole or not at all."""
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        for name, path in files.items():
            shutil.move(str(path), staging / name)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
