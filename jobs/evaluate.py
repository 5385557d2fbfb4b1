"""ONNX models side by side on a split of shards: `compound model evaluate` and a pipeline's evaluate stage.

Each model sees the split through the evaluation transform at its own input size, the first model is
the reference every other's agreement is counted against, and with a run the figures and confusion
matrices go to MLflow (`cluster.evaluate` holds the measuring itself).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cluster.data.manifest import ShardManifest, load_manifest
from cluster.evaluate import Evaluation, evaluate, split_batches
from cluster.storage import S3Access


def evaluate_side_by_side(models: dict[str, Path], manifest: ShardManifest, *, split: str, threads: int,
                          s3: S3Access) -> dict[str, Evaluation]:
    """label → each ONNX model's evaluation on the split (the split read once per input size)."""
    batches: dict[int, list] = {}
    evaluations, reference = {}, None
    for label, path in models.items():
        resolution = input_resolution(path)
        if resolution not in batches:
            batches[resolution] = list(split_batches(manifest, split, resolution=resolution, s3=s3))
        evaluation, logits = evaluate(path, batches[resolution], num_classes=len(manifest.classes), threads=threads,
                                      reference=reference)
        reference = logits if reference is None else reference
        evaluations[label] = evaluation
    return evaluations


def evaluate_models(paths: list[Path], *, data: str, split: str, threads: int, s3: S3Access, tracking_uri: str,
                    run_id: str | None = None) -> list[Evaluation]:
    """`compound model evaluate`: ONNX files of one input size on the split, agreement against the first."""
    resolution = input_resolution(paths[0])
    for path in paths[1:]:
        if input_resolution(path) != resolution:
            raise ValueError(f"{path} takes {input_resolution(path)} px images, {paths[0]} {resolution} px; "
                             "compare models of one input size")
    manifest = manifest_at(data, s3)
    labels = [Path(path).stem.replace(".", "_") for path in paths]
    if len(set(labels)) < len(labels):  # model.onnx from two folders: told apart by their place
        labels = [f"{index}_{label}" for index, label in enumerate(labels)]
    evaluations = evaluate_side_by_side(dict(zip(labels, paths, strict=True)), manifest, split=split,
                                        threads=threads, s3=s3)
    if run_id is not None:
        log_evaluations(tracking_uri, run_id, evaluations, manifest.classes)
    return list(evaluations.values())


def log_evaluations(tracking_uri: str, run_id: str, evaluations: dict[str, Evaluation], classes: list[str]) -> None:
    """Each evaluation's figures as `<label>_…` metrics and its confusion matrix as a plot, on the run."""
    import torch
    from mlflow import MlflowClient

    from cluster.plots import confusion_matrix

    client = MlflowClient(tracking_uri)
    metrics = {key: value for label, e in evaluations.items() for key, value in e.metrics(label).items()}
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for label, e in evaluations.items():
        png = confusion_matrix(torch.from_numpy(e.confusion), classes, title=f"{label}: {Path(e.path).name}")
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / f"confusion_{label}.png"
            path.write_bytes(png)
            client.log_artifact(run_id, str(path), "evaluation")


def manifest_at(data: str, s3: S3Access) -> ShardManifest:
    return load_manifest(data, s3=s3)[0]


def input_resolution(path: Path) -> int:
    """The input side an ONNX classifier was exported for."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return dims[-1].dim_value
