"""A trained model as ONNX fp32 and int8 (`compound model quantize`, a pipeline's quantize stage).

The model a source names (an S3 checkpoint, an MLflow model, a weights file) is exported to ONNX with a
dynamic batch, quantized to int8 calibrated on real training batches (`cluster.quantize`: the first
recipe within the accuracy limit), and both are evaluated on the validation split; with a run, the
figures and confusion matrices go to MLflow. The output folder appears whole (fp32 model, int8 model,
report) or not at all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cluster.evaluate import Evaluation, evaluate, split_batches
from cluster.quantize import RECIPES, Attempt, Recipe, quantize, write_atomically
from cluster.storage import S3Access
from cluster.train.distill import load_pinned
from jobs.evaluate import log_evaluations, manifest_at
from jobs.model_source import ModelRef, fetch_model

log = logging.getLogger(__name__)

FP32_FILE, INT8_FILE, REPORT_FILE = "model.fp32.onnx", "model.int8.onnx", "quantization.json"


@dataclass(frozen=True)
class QuantizeOutcome:
    out: Path
    recipe: Recipe
    attempts: list[Attempt]
    fp32: Evaluation
    int8: Evaluation


def quantize_model(ref: ModelRef, *, data: str, out: Path, max_drop_points: float, calibration_batches: int,
                   threads: int, s3: S3Access, tracking_uri: str, run_id: str | None = None,
                   recipes: tuple[Recipe, ...] = RECIPES) -> QuantizeOutcome:
    from effnet.export import export_onnx

    manifest = manifest_at(data, s3)
    with tempfile.TemporaryDirectory(prefix="compound-quantize-") as directory:
        work = Path(directory)
        pinned, _ = fetch_model(ref, len(manifest.classes), s3=s3, tracking_uri=tracking_uri, out=work)
        model, info = load_pinned(pinned, device=_cpu())
        if info.num_classes != len(manifest.classes):
            raise ValueError(f"{ref.source} predicts {info.num_classes} classes, the dataset at {data} has "
                             f"{len(manifest.classes)}; evaluate on the data it was trained for")
        fp32 = export_onnx(model, work / FP32_FILE, resolution=info.resolution, dynamic_batch=True)
        calibration = list(split_batches(manifest, "train", resolution=info.resolution, s3=s3, shuffle=True,
                                         limit=calibration_batches))
        validation = list(split_batches(manifest, "val", resolution=info.resolution, s3=s3))
        quantized = quantize(fp32, work / INT8_FILE, calibration=calibration, evaluation=validation,
                             max_drop_points=max_drop_points, threads=threads, recipes=recipes)
        recipe, attempts = quantized.recipe, quantized.attempts
        fp32_eval, reference = evaluate(fp32, validation, num_classes=len(manifest.classes), threads=threads,
                                        logits=quantized.fp32_logits)
        int8_eval, _ = evaluate(work / INT8_FILE, validation, num_classes=len(manifest.classes), threads=threads,
                                reference=reference, logits=quantized.int8_logits)
        report = {"source": ref.source, "model": dataclasses.asdict(info), "data": data,
                  "recipe": {"name": recipe.name, "description": recipe.description},
                  "max_drop_points": max_drop_points, "calibration_batches": len(calibration),
                  "attempts": [dataclasses.asdict(a) for a in attempts],
                  "fp32": _figures(fp32_eval), "int8": _figures(int8_eval)}
        (work / REPORT_FILE).write_text(json.dumps(report, indent=2))
        write_atomically({name: work / name for name in (FP32_FILE, INT8_FILE, REPORT_FILE)}, out)
    fp32_eval = dataclasses.replace(fp32_eval, path=str(out / FP32_FILE))
    int8_eval = dataclasses.replace(int8_eval, path=str(out / INT8_FILE))
    if run_id is not None:
        from mlflow import MlflowClient

        log_evaluations(tracking_uri, run_id, {"fp32": fp32_eval, "int8": int8_eval}, manifest.classes)
        MlflowClient(tracking_uri).log_dict(run_id, report, f"evaluation/{REPORT_FILE}")
    return QuantizeOutcome(out=out, recipe=recipe, attempts=attempts, fp32=fp32_eval, int8=int8_eval)


def _figures(evaluation: Evaluation) -> dict:
    return {key: value for key, value in dataclasses.asdict(evaluation).items() if key != "confusion"}


def _cpu():
    import torch

    return torch.device("cpu")
