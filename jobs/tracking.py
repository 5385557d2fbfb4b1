"""The driver's side of tracking: one MLflow run per job, found again on every launch, and the
model logged to it at the end.

A job's run is found by, in order: the run id recorded in the job's storage (`compound-job.json`),
then a run of the experiment tagged `compound.job=<name>`; only a job with neither gets a new run.
So a restarted worker group, a killed driver launched again and a resubmission all continue the
same run, and a driver killed between creating the run and recording it finds it by its tag.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import subprocess
import tempfile
from pathlib import Path

from cluster.data.manifest import ShardManifest
from cluster.storage import S3Access, split_s3_url
from cluster.tracking import MAX_TAG_VALUE_LENGTH, RunRef
from cluster.train.checkpoint import CHECKPOINT_PREFIX, Progress
from cluster.train.config import DeepSpeedStrategy
from cluster.train.distill import teacher_url
from cluster.train.strategy import deepspeed_config
from jobs.resolve import ResolvedJob
from jobs.spec import JobSpec, dump_spec
from jobs.tags import (
    BEST_CHECKPOINT_TAG,
    BEST_JOB_TAG,
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    CHECKPOINTS_TAG,
    CODE_VERSION_TAG,
    DATASET_TAG_PREFIX,
    EXPERIMENT_KIND_TAG,
    JOB_TAG,
    MODEL_TAG,
    MODEL_TRAINING_KIND,
    STRATEGY_TAG,
    SUBMISSION_TAG,
    SWEEP_TAG,
    TEACHER_PINNED_TAG,
    TEACHER_TAG,
    TRIAL_STATUS_TAG,
    WORLD_SIZE_TAG,
)

log = logging.getLogger(__name__)

MAX_PARAM_VALUE_LENGTH = 500  # what MLflow stores everywhere (some backends allow more)
MAX_PARAMS_PER_BATCH = 100  # params, and tags, per log_batch request
MODEL_NAME = "model"
BEST_METRIC = "val_top1"


class TrackingUnavailableError(ConnectionError):
    """The MLflow server does not answer; the message says where and what to do."""


def open_run(job: ResolvedJob, *, tracking_uri: str, recorded_run_id: str | None,
             submission_id: str | None) -> RunRef:
    """The job's one MLflow run (found or created), marked running, with its params, tags and spec."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    spec = job.spec
    client = MlflowClient(tracking_uri)
    try:
        experiment, run_name = spec.run_names
        experiment_id = experiment_id_of(client, experiment)
        run = _existing_run(client, experiment_id, spec.name, recorded_run_id)
        if run is None:
            run = client.create_run(experiment_id, run_name=run_name, tags={JOB_TAG: spec.name})
            log.info("new MLflow run %s for job %s", run.info.run_id, spec.name)
        elif run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        run_id = run.info.run_id
        _log_params(client, run_id, flatten(spec.model_dump(mode="json")), logged=run.data.params)
        tags = {**spec.tracking.tags, JOB_TAG: spec.name, CODE_VERSION_TAG: code_version(),
                WORLD_SIZE_TAG: _world_size(spec.scaling), STRATEGY_TAG: _strategy(spec),
                CHECKPOINTS_TAG: f"{spec.checkpoint.storage.rstrip('/')}/{spec.name}/",
                **{f"{DATASET_TAG_PREFIX}{field.split('.')[1]}": identity for field, identity in job.dataset_ids.items()}}
        if submission_id is not None:
            tags[SUBMISSION_TAG] = submission_id
        if spec.distill is not None:  # the run links what it was distilled from
            tags |= {TEACHER_TAG: spec.distill.teacher, TEACHER_PINNED_TAG: teacher_url(spec)}
        tags |= {"mlflow.source.name": f"compound {code_version()}", "mlflow.source.type": "JOB",
                 "mlflow.note.content": describe(spec)}
        log_tags(client, run_id, tags)
        client.log_text(run_id, dump_spec(spec), "spec.yaml")
        if isinstance(spec.strategy, DeepSpeedStrategy):
            config = deepspeed_config(spec, spec.scaling.max_workers)  # on the most workers
            client.log_text(run_id, json.dumps(config, indent=2), "deepspeed_config.json")
    except MlflowException as error:
        raise TrackingUnavailableError(
            f"cannot use the MLflow server at {tracking_uri}: {str(error).splitlines()[0][:300]}. Start the local "
            "stack with `compound up`, or point COMPOUND_MLFLOW_TRACKING_URI at your MLflow server") from None
    return RunRef(tracking_uri=tracking_uri, experiment_id=experiment_id, run_id=run_id,
                  started_s=run.info.start_time / 1000)


def log_dataset_input(client, run_id: str, url: str, manifest: ShardManifest, dataset_id: str, *,
                      context: str) -> None:
    """The dataset as an input of the run, where MLflow's UI lists them: named after its folder, its id (the
    manifest's sha256) as the digest, its splits' sizes as the profile, and what the run used it for."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    name = url.removesuffix("manifest.json").rstrip("/").rsplit("/", 1)[-1]
    profile = {"samples": {split: info.samples for split, info in manifest.splits.items()},
               "classes": len(manifest.classes)}
    dataset = Dataset(name=name, digest=dataset_id[:36], source_type="s3", source=json.dumps({"uri": url}),
                      profile=json.dumps(profile))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def experiment_id_of(client, name: str) -> str:
    """The experiment `name`, created if need be, marked as model training: MLflow's UI opens an experiment
    without `mlflow.experimentKind` in its GenAI view (traces, prompts) instead of the runs and their charts."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older compound, or by hand
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except MlflowException as error:  # created meanwhile by another launch
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _existing_run(client, experiment_id: str, job_name: str, recorded_run_id: str | None):
    from mlflow.exceptions import MlflowException

    if recorded_run_id is not None:
        try:
            run = client.get_run(recorded_run_id)
            if run.info.lifecycle_stage == "active":
                return run
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        log.warning("the job's MLflow run %s is gone; looking for another run of job %s", recorded_run_id, job_name)
    name = job_name.replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{name}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0] if runs else None


def find_run(tracking_uri: str, *, experiment: str, job_name: str) -> RunRef | None:
    """The job's MLflow run, if it exists yet (None also when the server does not answer)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        run = found and _existing_run(client, found.experiment_id, job_name, None)
    except MlflowException:
        return None
    if not run:
        return None
    return RunRef(tracking_uri=tracking_uri, experiment_id=run.info.experiment_id, run_id=run.info.run_id,
                  started_s=run.info.start_time / 1000)


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """A nested spec as MLflow params: dotted paths, values as text within MLflow's length limit."""
    params: dict[str, str] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params |= flatten(value, f"{path}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[path] = text if len(text) <= MAX_PARAM_VALUE_LENGTH else text[:MAX_PARAM_VALUE_LENGTH - 1] + "…"
    return params


def _log_params(client, run_id: str, params: dict[str, str], *, logged: dict[str, str]) -> None:
    """The params the run does not have yet (a relaunch may change tracking and failure settings, and
    MLflow refuses to change a logged param)."""
    from mlflow.entities import Param

    changed = sorted(key for key, value in params.items() if key in logged and logged[key] != value)
    if changed:
        log.info("MLflow params keep their first values for: %s", ", ".join(changed))
    new = [Param(key, value) for key, value in params.items() if key not in logged]
    _log_in_batches(client, run_id, params=new)


def _world_size(scaling) -> str:
    """Workers as the spec asks for them: a number, or MIN-MAX for an elastic job."""
    return f"{scaling.min_workers}-{scaling.max_workers}" if scaling.elastic else str(scaling.max_workers)


def describe(spec: JobSpec) -> str:
    """The run's description: what is trained, how, on what — what a person reads first."""
    model, scaling = spec.model, spec.scaling
    devices = f"{_world_size(scaling)} {'GPU' if scaling.use_gpu else 'CPU'} workers"
    return (f"{model.arch} ({model.num_classes} classes, {model.resolution} px), {spec.optim.epochs} epochs of "
            f"{spec.data.train.manifest} (split {spec.data.train.split}), {_strategy(spec)} on {devices}, "
            f"{spec.precision.dtype}, global batch {spec.global_batch}. "
            f"Checkpoints: {spec.checkpoint.storage.rstrip('/')}/{spec.name}/")


def log_tags(client, run_id: str, tags: dict[str, str]) -> None:
    """Set the tags, as few requests as MLflow's per-batch limit allows."""
    from mlflow.entities import RunTag

    _log_in_batches(client, run_id, tags=[RunTag(key, value[:MAX_TAG_VALUE_LENGTH]) for key, value in tags.items()])


def _log_in_batches(client, run_id: str, **entries: list) -> None:
    """`log_batch` for one kind of entry (params=[…] or tags=[…]), within MLflow's per-request limit."""
    ((kind, items),) = entries.items()
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, **{kind: items[start:start + MAX_PARAMS_PER_BATCH]})


def _strategy(spec: JobSpec) -> str:
    if isinstance(spec.strategy, DeepSpeedStrategy):
        return f"deepspeed-zero{spec.strategy.zero_stage}"
    return spec.strategy.name


@functools.cache
def code_version() -> str:
    """compound's version, and the git commit when it runs from a checkout."""
    version = importlib.metadata.version("compound")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}"


def finish_run(run: RunRef, *, status: str, required: bool = True) -> None:
    """Mark the run ended; a run that is not `required` to end (the job failed anyway) may stay RUNNING
    when MLflow does not answer."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(run.tracking_uri).set_terminated(run.run_id, status=status)
    except MlflowException as error:
        if required:
            raise
        log.warning("could not mark MLflow run %s %s: %s", run.run_id, status, str(error).splitlines()[0][:200])


def log_final_model(run: RunRef, spec: JobSpec, *, checkpoint: str, history: list[dict], s3: S3Access) -> None:
    """Tag the best kept checkpoint, and log the final weights as the run's model (once per checkpoint)."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(run.tracking_uri)
    best = _best_checkpoint(checkpoint, history, s3)
    if best is not None:
        client.set_tag(run.run_id, BEST_CHECKPOINT_TAG, best)
    if client.get_run(run.run_id).data.tags.get(MODEL_TAG) == checkpoint:
        return
    import torch
    from mlflow.models import infer_signature

    model = _final_model(checkpoint, spec.model.num_classes, s3=s3, tracking_uri=run.tracking_uri)
    example = _input_example(spec)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(run.tracking_uri)
    # The fluent API refuses a run outside the process's active experiment, which a caller in the same
    # process (a pipeline, a notebook) may have set: the run's own becomes the active one.
    mlflow.set_experiment(experiment_id=run.experiment_id)
    with mlflow.start_run(run_id=run.run_id):
        mlflow.pytorch.log_model(
            model, name=MODEL_NAME, signature=infer_signature(example, output), input_example=example,
            pip_requirements=_requirements(),
        )
    client.set_tag(run.run_id, MODEL_TAG, checkpoint)


def _final_model(checkpoint: str, num_classes: int, *, s3: S3Access, tracking_uri: str):
    """The model at an epoch-end checkpoint, loaded as every later stage loads one (`fetch_model`)."""
    import torch

    from cluster.train.distill import load_pinned
    from jobs.model_source import ModelRef, fetch_model

    with tempfile.TemporaryDirectory(prefix="compound-model-") as directory:
        pinned, _ = fetch_model(ModelRef(checkpoint), num_classes, s3=s3, tracking_uri=tracking_uri,
                                out=Path(directory))
        model, _ = load_pinned(pinned, torch.device("cpu"))
    return model


def _input_example(spec: JobSpec):
    """Two images: MLflow saves the model with torch.export, which would fix a batch of one as the only size."""
    import numpy as np

    size = spec.model.resolution
    return np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)


def _requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "torchvision", "safetensors")]


def _best_checkpoint(latest: str, history: list[dict], s3: S3Access) -> str | None:
    """The kept epoch-end checkpoint with the best validation top-1 (the latest if none is kept)."""
    base = latest.rstrip("/").rsplit("/", 1)[0]
    bucket, prefix = split_s3_url(f"{base}/")
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix + CHECKPOINT_PREFIX, Delimiter="/")
    kept = {entry["Prefix"][len(prefix):].rstrip("/") for entry in listing.get("CommonPrefixes", [])}
    scored = [(record.get(BEST_METRIC, float("-inf")), record["epoch"]) for record in history
              if Progress(epoch=record["epoch"] + 1).name in kept]
    if not scored:
        return latest
    _, epoch = max(scored)
    return f"{base}/{Progress(epoch=epoch + 1).name}"


# --- sweeps: one parent run, a child run per trial (each trial is a job with the parent's id) --------

def open_sweep_run(tracking_uri: str, *, experiment: str, sweep_name: str, params: dict[str, str],
                   tags: dict[str, str], spec_yaml: str) -> RunRef:
    """The sweep's one parent run (found by its tag, else created), marked running, with the search's settings."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        experiment_id = experiment_id_of(client, experiment)
        name = sweep_name.replace("'", "\\'")
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{name}'",
                                  order_by=["attributes.start_time ASC"], max_results=1)
        if runs:
            run = runs[0]
            if run.info.status != "RUNNING":
                client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=sweep_name, tags={SWEEP_TAG: sweep_name})
        _log_params(client, run.info.run_id, params, logged=run.data.params)
        log_tags(client, run.info.run_id, {**tags, SWEEP_TAG: sweep_name, CODE_VERSION_TAG: code_version(),
                                            "mlflow.source.name": f"compound {code_version()}",
                                            "mlflow.source.type": "JOB"})
        client.log_text(run.info.run_id, spec_yaml, "sweep.yaml")
    except MlflowException as error:
        raise TrackingUnavailableError(
            f"cannot use the MLflow server at {tracking_uri}: {str(error).splitlines()[0][:300]}. Start the local "
            "stack with `compound up`, or point COMPOUND_MLFLOW_TRACKING_URI at your MLflow server") from None
    return RunRef(tracking_uri=tracking_uri, experiment_id=experiment_id, run_id=run.info.run_id,
                  started_s=run.info.start_time / 1000)


def mark_trial(tracking_uri: str, *, experiment_id: str, job_name: str, status: str, ended: str | None) -> None:
    """Tag a trial's child run with how the trial ended; `ended`: the run status to set (KILLED for a
    trial ASHA stopped, whose driver was stopped with it). Best effort: the sweep goes on without MLflow."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run = _existing_run(client, experiment_id, job_name, None)
        if run is None:
            return
        client.set_tag(run.info.run_id, TRIAL_STATUS_TAG, status)
        if ended is not None and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status=ended)
    except MlflowException as error:
        log.warning("could not mark the MLflow run of trial %s: %s", job_name, str(error).splitlines()[0][:200])


def trial_run_id(tracking_uri: str, *, experiment_id: str, job_name: str) -> str | None:
    from mlflow import MlflowClient

    run = _existing_run(MlflowClient(tracking_uri), experiment_id, job_name, None)
    return run.info.run_id if run else None


def record_sweep_result(parent: RunRef, *, best: dict, trials: list[dict], plot: bytes) -> None:
    """The best trial (config as `best.<path>` params, metric, checkpoint, child run) and every trial, on the
    parent run, which is then marked finished."""
    from mlflow import MlflowClient

    client = MlflowClient(parent.tracking_uri)
    logged = client.get_run(parent.run_id).data.params
    _log_params(client, parent.run_id, {f"best.{path}": str(value)[:MAX_PARAM_VALUE_LENGTH]
                                        for path, value in best["config"].items()}, logged=logged)
    client.log_metric(parent.run_id, f"best_{best['metric']}", best["value"])
    log_tags(client, parent.run_id, {BEST_TRIAL_TAG: best["trial"], BEST_JOB_TAG: best["job"],
                                      BEST_CHECKPOINT_TAG: best["checkpoint"], BEST_RUN_TAG: best.get("mlflow_run_id") or ""})
    client.log_text(parent.run_id, json.dumps(best, indent=2), "best.json")
    client.log_text(parent.run_id, json.dumps(trials, indent=2), "trials.json")
    with tempfile.TemporaryDirectory(prefix="compound-plot-") as directory:
        (Path(directory) / "parallel_coordinates.png").write_bytes(plot)
        client.log_artifact(parent.run_id, str(Path(directory) / "parallel_coordinates.png"), "plots")
    client.set_terminated(parent.run_id, status="FINISHED")
