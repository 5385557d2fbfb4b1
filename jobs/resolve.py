"""A job spec checked against what it points at: datasets on S3, the checkpoint storage, and the
job's earlier launches. Every problem is a `SpecError` naming the field, so nothing starts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from cluster.data.manifest import ManifestError, ShardManifest, load_manifest, verify_shards
from cluster.data.spec import SplitRef
from cluster.storage import S3Access, is_not_found, s3_error_code, split_s3_url
from cluster.train.checkpoint import CHECKPOINT_PREFIX
from cluster.train.config import ModelSpec
from cluster.train.models import build_model
from jobs.model_source import ModelSourceError, resolve_teacher
from jobs.spec import JobSpec, SpecError

log = logging.getLogger(__name__)

JOB_RECORD = "compound-job.json"  # in <storage>/<job name>/: the spec the job was first launched with
# What may change between launches of one job: it does not change what is trained.
RELAUNCH_MAY_CHANGE = ("tracking", "failure", "checkpoint.keep")


@dataclass(frozen=True)
class ResolvedJob:
    """A spec with everything filled in, and the identity of the data it trains on."""

    spec: JobSpec
    dataset_ids: dict[str, str]  # "data.train" / "data.val" → sha256 of the split's manifest

    def record(self) -> dict:
        """What a launch records in storage, and a relaunch must match."""
        return {"spec": self.spec.model_dump(mode="json"), "datasets": self.dataset_ids}


def resolve_job(spec: JobSpec, *, s3: S3Access, default_storage: str, source: str, tracking_uri: str) -> ResolvedJob:
    """The spec with the dataset's class count, the storage and a distilling teacher's model filled in,
    after checking that the datasets exist, hold the named splits, and have enough shards for every
    reader, and that the teacher loads and predicts the same classes."""
    problems: list[str] = []
    manifests: dict[str, ShardManifest] = {}
    dataset_ids: dict[str, str] = {}
    assert spec.data.val is not None
    for field, ref in (("data.train", spec.data.train), ("data.val", spec.data.val)):
        found = _check_split(field, ref, spec, s3, problems)
        if found is not None:
            manifests[field], dataset_ids[field] = found
    num_classes = spec.model.num_classes
    if "data.train" in manifests:
        classes = manifests["data.train"].classes
        if num_classes is None:
            num_classes = len(classes)
        elif num_classes != len(classes):
            problems.append(f"model.num_classes: {num_classes}, but the dataset has {len(classes)} classes; "
                            "leave it out to take the dataset's")
        val = manifests.get("data.val")
        if val is not None and val.classes != classes:
            problems.append("data.val: its classes differ from data.train's; use splits of one dataset")
        warmup = spec.warmup_problem(manifests["data.train"].split(spec.data.train.split).samples)
        if warmup is not None:
            problems.append(warmup)
    storage = spec.checkpoint.storage or default_storage
    _check_bucket("checkpoint.storage", storage, s3, problems)
    model = spec.model.model_copy(update={"num_classes": num_classes})
    if model.pretrained is not None and num_classes is not None:
        _check_weights(model, problems)
    if problems:
        raise SpecError(source, problems)
    resolved = spec.model_copy(update={"model": model,
                                       "checkpoint": spec.checkpoint.model_copy(update={"storage": storage})})
    if spec.distill is not None:
        try:
            distill = resolve_teacher(resolved, s3=s3, tracking_uri=tracking_uri)
        except ModelSourceError as error:
            raise SpecError(source, [f"distill.teacher: {error}"]) from None
        resolved = resolved.model_copy(update={"distill": distill})
    return ResolvedJob(resolved, dataset_ids)


def _check_weights(model: ModelSpec, problems: list[str]) -> None:
    """Build the model with its weights here, so a file that does not fit fails before any worker starts."""
    try:
        build_model(model)
    except (ValueError, OSError, RuntimeError) as error:  # WeightsMismatchError is a ValueError
        problems.append(f"model.pretrained: {error}")


def _check_split(
    field: str, ref: SplitRef, spec: JobSpec, s3: S3Access, problems: list[str],
) -> tuple[ShardManifest, str] | None:
    try:
        manifest, dataset_id = load_manifest(ref.manifest, s3=s3)
    except ManifestError as error:
        problems.append(f"{field}.manifest: {error}")
        return None
    if ref.split not in manifest.splits:
        problems.append(f"{field}.split: the dataset has no split {ref.split!r}; it has {', '.join(manifest.splits)}")
        return None
    samples = manifest.split(ref.split).samples
    readers = spec.scaling.max_workers * max(1, spec.data.loader_workers)
    if samples < readers:
        problems.append(
            f"{field}: the {ref.split!r} split has {samples} samples, fewer than the {readers} readers "
            f"(scaling.num_workers × data.loader_workers) that each need one; use fewer workers or loader "
            "workers, or a larger split")
        return None
    try:
        verify_shards(manifest, ref.split, s3=s3)
    except ManifestError as error:
        problems.append(f"{field}: {error}")
        return None
    return manifest, dataset_id


def _check_bucket(field: str, url: str, s3: S3Access, problems: list[str]) -> None:
    bucket, _ = split_s3_url(url.rstrip("/") + "/")
    try:
        s3.client().head_bucket(Bucket=bucket)
    except ClientError as error:
        problems.append(f"{field}: bucket {bucket!r} of {url} is not there or not ours ({s3_error_code(error)}); "
                        "create it, or leave checkpoint.storage out to use the stack's checkpoints bucket")
    except BotoCoreError as error:
        problems.append(f"{field}: could not reach the S3 store for {url}: {error}")


@dataclass(frozen=True)
class Launch:
    """What the job's storage says about earlier launches."""

    resumes: bool  # it holds checkpoints: training continues from the latest
    record: dict | None  # the job's record there, if any
    location: tuple[str, str]  # bucket and key of the record

    @property
    def run_id(self) -> str | None:
        """The MLflow run an earlier launch recorded."""
        return (self.record or {}).get("mlflow_run_id")


def check_relaunch(job: ResolvedJob, *, s3: S3Access, source: str) -> Launch:
    """Refuse a launch whose spec or data differs from what the job's checkpoints were trained with
    (resuming them would not be exact). Writes nothing: `record_launch` does, once the launch is sure.

    A launch that left no checkpoint binds nothing: the next launch records its own spec.
    """
    spec = job.spec
    assert spec.checkpoint.storage is not None
    bucket, folder = split_s3_url(f"{spec.checkpoint.storage.rstrip('/')}/{spec.name}/")
    key = folder + JOB_RECORD
    client = s3.client()
    try:
        recorded = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as error:
        if not is_not_found(error):
            raise
        recorded = None
    has_checkpoints = client.list_objects_v2(Bucket=bucket, Prefix=folder + CHECKPOINT_PREFIX, MaxKeys=1)["KeyCount"]
    launch = Launch(resumes=bool(has_checkpoints), record=recorded, location=(bucket, key))
    if not has_checkpoints:
        return launch
    if recorded is None:
        problem = (f"s3://{bucket}/{folder} holds checkpoints of a job {spec.name!r} that compound did not record; "
                   "give this job another name")
        raise SpecError(source, [problem])
    current = job.record()
    changed = _differences(_with_current_defaults(recorded.get("spec", {})), current["spec"])
    if changed:
        problem = (f"job {spec.name!r} was launched before with another spec (s3://{bucket}/{key}); "
                   f"changed: {', '.join(changed)}. Resuming it would not continue the same training: give the "
                   "job a new name to start over, or put those values back to resume it")
        raise SpecError(source, [problem])
    rewritten = [field for field, identity in current["datasets"].items()
                 if recorded.get("datasets", {}).get(field) != identity]
    if rewritten:
        raise SpecError(source, [
            f"{field}: the dataset at {getattr(spec.data, field.split('.')[1]).manifest} was written again since "
            f"job {spec.name!r} was first launched; resuming would mix two datasets. Give the job a new name."
            for field in rewritten])
    return launch


def record_launch(job: ResolvedJob, launch: Launch, *, s3: S3Access, run_id: str | None) -> None:
    """Record the job's spec, data and MLflow run in its storage; a launch that resumes keeps the spec
    the checkpoints were trained with."""
    base = launch.record if launch.resumes and launch.record is not None else job.record()
    record = {**base, "mlflow_run_id": run_id}
    if record == launch.record:
        return
    bucket, key = launch.location
    s3.client().put_object(Bucket=bucket, Key=key, Body=json.dumps(record, indent=2).encode(),
                           ContentType="application/json")


def _with_current_defaults(recorded: dict) -> dict:
    """A recorded spec as this version resolves it: fields added since it was recorded take their
    defaults, which keep the behaviour it was trained with, so an upgrade alone changes nothing."""
    try:
        return JobSpec.model_validate(recorded).model_dump(mode="json")
    except ValueError:  # a record this version cannot read: compared as it is
        return recorded


def _differences(recorded: dict, current: dict, path: str = "") -> list[str]:
    changed = []
    for key in sorted(set(recorded) | set(current)):
        where = f"{path}.{key}" if path else key
        if where in RELAUNCH_MAY_CHANGE:
            continue
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _differences(old, new, where)
        elif old != new:
            changed.append(where)
    return changed
