"""A Ray Train `TorchTrainer` for a resolved training spec (elastic jobs size themselves as `scaling` says).

The run is named after the job and stores its checkpoints under `<storage>/<job name>/` on S3
through a pyarrow filesystem. Launching the same job again (same name, same storage) after its
driver died is how Ray Train V2 resumes: it finds the run's checkpoint record there and the
workers start from the latest checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cluster.storage import S3Access, split_s3_url
from cluster.tracking import WORKER_MLFLOW_ENV, RunRef, TrackingSpec
from cluster.train.config import TrainingSpec
from cluster.train.loop import WorkerJob, train_loop_per_worker

# glibc returns large buffers to the OS with munmap as soon as they are freed, so every training
# step page-faults its activations in again; served from a heap that is never trimmed, they are
# reused (effnet's benchmark: most of its training-speed gain comes from fewer fresh buffers).
# 32 MiB is the largest mmap threshold glibc accepts on 64-bit.
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def storage_path(storage: str) -> str:
    """s3://bucket/prefix → bucket/prefix, the form a pyarrow S3 filesystem takes."""
    bucket, prefix = split_s3_url(storage.rstrip("/") + "/")
    return f"{bucket}/{prefix}".rstrip("/")


def threads_per_worker(spec: TrainingSpec) -> int:
    return max(1, math.floor(spec.scaling.cpus_per_worker))


def worker_env(spec: TrainingSpec) -> dict[str, str]:
    return {**ALLOCATOR_ENV, **WORKER_MLFLOW_ENV, "OMP_NUM_THREADS": str(threads_per_worker(spec))}


def make_trainer(spec: TrainingSpec, *, s3: S3Access, storage: str, spec_json: str,
                 dataset_ids: dict[str, str], run: RunRef | None = None,
                 tracking: TrackingSpec | None = None, callbacks: Sequence = (),
                 sigterm_notice: bool = True):  # -> TorchTrainer
    """`sigterm_notice`: a SIGTERM to a worker is a preemption notice (not in a sweep's trials, whose workers
    Tune ends with SIGTERM when it stops them: there the notice turned a stopped trial into a failed one)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from cluster.train.scaling import ElasticTorchTrainer
    from cluster.train.sigterm import SigtermNotice

    scaling = spec.scaling
    job = WorkerJob(spec=spec, s3=s3, spec_json=spec_json, threads_per_worker=threads_per_worker(spec),
                    dataset_ids=dataset_ids, run=run, tracking=tracking or TrackingSpec())
    return ElasticTorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=(scaling.min_workers, scaling.max_workers) if scaling.elastic else scaling.max_workers,
            use_gpu=scaling.use_gpu, resources_per_worker=scaling.worker_resources,
            elastic_resize_monitor_interval_s=scaling.grow_check_s),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=spec.name, storage_path=storage_path(storage), storage_filesystem=s3.filesystem(),
            failure_config=FailureConfig(max_failures=spec.failure.max_failures,
                                         max_preemption_failures=spec.failure.max_preemptions),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            worker_runtime_env={"env_vars": worker_env(spec)},
            callbacks=[*callbacks, *([SigtermNotice(spec.failure.sigterm_grace_s)] if sigterm_notice else [])],
        ),
    )
