"""ONNX classifiers on a split of shards: accuracy, agreement with a reference, latency and size.

The images are the evaluation transform's (resize, center crop, normalise), the same a training job
validates on, so an fp32 export scores what PyTorch scores. Padding in a split's last batch has
weight 0 and counts nowhere.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cluster.data.loader import ShardLoader
from cluster.data.manifest import ShardManifest
from cluster.storage import S3Access

TOP_K = (1, 5)
LATENCY_BATCHES = (1, 32)
LATENCY_RUNS = {1: 50, 32: 10}  # timed runs after warm-up, per batch size
EVAL_BATCH = 32


@dataclass(frozen=True)
class Evaluation:
    """One model on one split."""

    path: str
    samples: int
    top1: float
    top5: float
    majority_top1: float  # of always answering the split's most common class: what a model must beat
    agreement: float | None  # top-1 predictions equal to the reference model's (None: it is the reference)
    latency_ms: dict[int, dict[str, float]]  # batch size → {"p50": …, "p95": …}
    threads: int
    size_mb: float
    confusion: np.ndarray = field(repr=False)  # [true class, predicted class] counts

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat MLflow metrics: `<prefix>_top1`, `<prefix>_latency_b32_p50_ms`, …"""
        values = {"top1": self.top1, "top5": self.top5, "size_mb": self.size_mb}
        if self.agreement is not None:
            values["agreement"] = self.agreement
        for batch, stats in self.latency_ms.items():
            values |= {f"latency_b{batch}_{name}_ms": value for name, value in stats.items()}
        return {f"{prefix}_{key}": value for key, value in values.items()}


def session(path: str | Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def split_batches(manifest: ShardManifest, split: str, *, resolution: int, s3: S3Access | None,
                  batch_size: int = EVAL_BATCH, limit: int | None = None,
                  shuffle: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(images, labels, weights) of the split through the evaluation transform, in order unless `shuffle`
    (seeded), at most `limit` batches."""
    loader = ShardLoader(manifest, split, batch_size=batch_size, resolution=resolution, s3=s3, shuffle=shuffle)
    for index, batch in enumerate(loader):
        if limit is not None and index >= limit:
            return
        yield batch.images.numpy(), batch.labels.numpy(), batch.weights.numpy()


def predict(path: str | Path, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]], threads: int) -> np.ndarray:
    """Logits of every batch, concatenated (padding included)."""
    model = session(path, threads)
    name = model.get_inputs()[0].name
    return np.concatenate([model.run(None, {name: images})[0] for images, _, _ in batches])


def evaluate(path: str | Path, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]], *, num_classes: int,
             threads: int, reference: np.ndarray | None = None,
             logits: np.ndarray | None = None) -> tuple[Evaluation, np.ndarray]:
    """The model at `path` on `batches`; and its logits (a reference for the next model). `logits`:
    its predictions on `batches` when already made (`predict`'s), so they are not made again."""
    logits = predict(path, batches, threads) if logits is None else logits
    labels = np.concatenate([labels for _, labels, _ in batches])
    weights = np.concatenate([weights for _, _, weights in batches]) > 0
    logits, labels = logits[weights], labels[weights]
    # stable: int8 logits tie often, and a tie goes to the lower class, as `argmax` (and `quantize`) decide it
    ranked = np.argsort(-logits, axis=1, kind="stable")
    top = {k: float((ranked[:, :k] == labels[:, None]).any(axis=1).mean()) for k in TOP_K}
    predicted = ranked[:, 0]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    agreement = None if reference is None else float((predicted == reference.argmax(axis=1)).mean())
    evaluation = Evaluation(
        path=str(path), samples=int(weights.sum()), top1=top[1], top5=top[5],
        majority_top1=float(np.bincount(labels).max() / len(labels)), agreement=agreement,
        latency_ms=latency(path, batches[0][0], threads), threads=threads,
        size_mb=Path(path).stat().st_size / 1e6, confusion=confusion,
    )
    return evaluation, logits


def latency(path: str | Path, images: np.ndarray, threads: int) -> dict[int, dict[str, float]]:
    """p50/p95 milliseconds per call at each of LATENCY_BATCHES (real images, tiled to the batch size)."""
    model = session(path, threads)
    name = model.get_inputs()[0].name
    stats = {}
    for batch in LATENCY_BATCHES:
        inputs = {name: np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))}
        for _ in range(3):  # warm-up: first calls allocate and pick kernels
            model.run(None, inputs)
        times = []
        for _ in range(LATENCY_RUNS[batch]):
            started = time.perf_counter()
            model.run(None, inputs)
            times.append((time.perf_counter() - started) * 1000)
        quantiles = statistics.quantiles(times, n=20, method="inclusive")
        stats[batch] = {"p50": statistics.median(times), "p95": quantiles[18]}
    return stats
