"""Trained models named by a user (a distillation's teacher, a model to quantize), found and checked.

A source may be:
- `s3://…/<checkpoint folder>`: a compound job's checkpoint (its weights and the spec it trained with),
  or `s3://…/<file>`: a weights file in the store;
- `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID/…`: a model a compound job logged to
  MLflow, followed to the checkpoint it was made from;
- a local weights file: a compound checkpoint, or a torchvision/timm state dict (`arch` names its model
  when the file does not).

`fetch_model` writes it as one pinned-model file (`cluster.train.distill`). A teacher is read and
checked when the job is resolved (nothing starts with a teacher that does not fit), and pinned (`TEACHER_FILE` in `<storage>/<job>/`) when the job is launched: every worker and
every restart distils from those weights, wherever the source points later.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from cluster.storage import S3Access, is_not_found, split_s3_url
from cluster.train.checkpoint import PROGRESS_FILE, WEIGHTS_FILE
from cluster.train.config import DistillSpec, ModelSpec, TrainingSpec
from cluster.train.distill import TEACHER_FILE, PinnedModel, pinned_info, save_pinned, teacher_url
from cluster.train.models import build_model
from effnet import VARIANTS
from jobs.tags import MODEL_TAG

PINNED_FILE = "pinned.safetensors"  # what `fetch_model` writes: the model, and what it is


class ModelSourceError(ValueError):
    """The model named cannot be used; the message says why and what to give instead."""


@dataclass(frozen=True)
class ModelRef:
    """What a user gave: the source, and what it may not say itself."""

    source: str
    arch: str | None = None
    resolution: int | None = None
    arch_field: str = "arch"  # how the user names the model: a spec field or a flag

    @classmethod
    def teacher(cls, distill: DistillSpec) -> ModelRef:
        return cls(distill.teacher, distill.teacher_arch, distill.teacher_resolution, "distill.teacher_arch")


def resolve_teacher(spec: TrainingSpec, *, s3: S3Access, tracking_uri: str) -> DistillSpec:
    """The spec's distill section with the teacher's model and resolution filled in, after checking that
    the teacher loads and predicts the student's classes. A job launched before keeps its pinned teacher."""
    distill = spec.distill
    assert distill is not None and spec.model.num_classes is not None
    with tempfile.TemporaryDirectory(prefix="compound-teacher-") as directory:
        info = _pinned(spec, s3, Path(directory)) or fetch_model(ModelRef.teacher(distill), spec.model.num_classes,
                                                                 s3=s3, tracking_uri=tracking_uri,
                                                                 out=Path(directory))[1]
    if info.num_classes != spec.model.num_classes:
        raise ModelSourceError(f"the teacher predicts {info.num_classes} classes, the student "
                               f"{spec.model.num_classes}; distil from a teacher trained on the same classes")
    if distill.features is not None and info.arch not in VARIANTS:
        raise ModelSourceError(f"distill.features needs an EfficientNet teacher, not {info.arch}; "
                               "remove distill.features")
    return _with_teacher(distill, info)


def pin_teacher(spec: TrainingSpec, *, s3: S3Access, tracking_uri: str) -> str:
    """Copy the resolved spec's teacher into the job's storage, unless it is there: its URL."""
    distill = spec.distill
    assert distill is not None and spec.model.num_classes is not None
    url = teacher_url(spec)
    with tempfile.TemporaryDirectory(prefix="compound-teacher-") as directory:
        if _pinned(spec, s3, Path(directory)) is None:
            path, _ = fetch_model(ModelRef.teacher(distill), spec.model.num_classes, s3=s3, tracking_uri=tracking_uri,
                                  out=Path(directory))
            bucket, key = split_s3_url(url)
            s3.client().upload_file(str(path), bucket, key)
    return url


def _with_teacher(distill: DistillSpec, info: PinnedModel) -> DistillSpec:
    return distill.model_copy(update={"teacher_arch": info.arch, "teacher_resolution": info.resolution})


def _pinned(spec: TrainingSpec, s3: S3Access, out: Path) -> PinnedModel | None:
    """The teacher this job pinned at an earlier launch, if it came from the same source."""
    bucket, key = split_s3_url(teacher_url(spec))
    path = out / TEACHER_FILE
    try:
        s3.client().download_file(bucket, key, str(path))
    except ClientError as error:
        if is_not_found(error):
            return None
        raise
    info = pinned_info(path)
    return info if info.source == spec.distill.teacher else None


def fetch_model(ref: ModelRef, num_classes: int, *, s3: S3Access, tracking_uri: str,
                out: Path) -> tuple[Path, PinnedModel]:
    """The model `ref` names, with a head for `num_classes` unless it knows its own, as a pinned-model
    file in `out`; and what it is."""
    source = ref.source
    if source.startswith(("models:/", "runs:/")):
        checkpoint = _logged_model_checkpoint(source, tracking_uri)
        return _from_checkpoint(checkpoint, ref, num_classes, s3=s3, out=out)
    if source.startswith("s3://"):
        if _exists(f"{source.rstrip('/')}/{PROGRESS_FILE}", s3):
            return _from_checkpoint(source.rstrip("/"), ref, num_classes, s3=s3, out=out)
        local = out / "weights"
        _download(source, local, s3)
        return _from_file(local, ref, num_classes, resolution=None, out=out)
    if "://" in source:
        raise ModelSourceError(f"{source}: give an s3:// checkpoint or file, a models:/ or runs:/ MLflow URI, "
                               "or a local weights file")
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"{source}: no such file here; give an s3:// checkpoint or file, a models:/ or "
                               "runs:/ MLflow URI, or a local weights file")
    return _from_file(path, ref, num_classes, resolution=None, out=out)


def check_source(source: str, *, s3: S3Access, tracking_uri: str) -> None:
    """`ModelSourceError` unless the model `source` names is there: what `fetch_model` would find first,
    without downloading it (a pipeline checks its literal models before its first stage trains)."""
    if source.startswith(("models:/", "runs:/")):
        checkpoint = _logged_model_checkpoint(source, tracking_uri)
        if not _exists(f"{checkpoint}/{PROGRESS_FILE}", s3):
            raise ModelSourceError(f"{source}: its checkpoint {checkpoint} is gone from the store")
    elif source.startswith("s3://"):
        if not (_exists(f"{source.rstrip('/')}/{PROGRESS_FILE}", s3) or _exists(source, s3)):
            raise ModelSourceError(f"{source}: no checkpoint folder or file there")
    elif "://" in source or not Path(source).expanduser().is_file():
        raise ModelSourceError(f"{source}: give an s3:// checkpoint or file, a models:/ or runs:/ MLflow URI, "
                               "or a local weights file that exists")


def _from_checkpoint(checkpoint: str, ref: ModelRef, num_classes: int, *, s3: S3Access,
                     out: Path) -> tuple[Path, PinnedModel]:
    """A compound job's checkpoint folder: its weights, at the resolution and model its spec trained."""
    progress = out / PROGRESS_FILE
    _download(f"{checkpoint}/{PROGRESS_FILE}", progress, s3)
    trained = json.loads(progress.read_text())["spec"]["model"]
    weights = out / WEIGHTS_FILE
    try:
        _download(f"{checkpoint}/{WEIGHTS_FILE}", weights, s3)
    except ModelSourceError:
        raise ModelSourceError(f"{checkpoint} is a checkpoint taken mid-epoch, without weights of their own; "
                               "give an epoch-end checkpoint (a job's latest at its end)") from None
    if ref.arch not in (None, trained["arch"]):
        raise ModelSourceError(f"{ref.arch_field} is {ref.arch}, but {checkpoint} trained {trained['arch']}; leave it out")
    return _from_file(weights, ModelRef(ref.source, trained["arch"], ref.resolution, ref.arch_field), num_classes,
                      resolution=trained["resolution"], out=out)


def _from_file(path: Path, ref: ModelRef, num_classes: int, *, resolution: int | None,
               out: Path) -> tuple[Path, PinnedModel]:
    """Load a weights file (its head must have `num_classes`, unless it knows its own) and write it pinned."""
    source = ref.source
    from effnet.weights import is_compound_checkpoint, load_checkpoint, load_weights, read_state_dict

    try:
        if is_compound_checkpoint(path):  # an EfficientNet that knows its own head
            model = load_checkpoint(path)
            arch, classes = model.spec.name, model.spec.num_classes
        else:
            arch, classes = ref.arch or _named_arch(path), num_classes
            if arch is None:
                raise ModelSourceError(f"{source} does not say which model it holds; name it with {ref.arch_field}")
            if arch in VARIANTS:
                model = load_weights(path, arch, num_classes=num_classes)
            else:
                model = build_model(ModelSpec(arch=arch, num_classes=num_classes))
                missing, unexpected = model.load_state_dict(read_state_dict(path), strict=False)
                if missing or unexpected:
                    raise ModelSourceError(f"{source} does not hold {arch} weights: {len(missing)} missing keys "
                                           f"({', '.join(missing[:3])}), {len(unexpected)} unexpected "
                                           f"({', '.join(unexpected[:3])}); give {ref.arch_field} its model")
    except ModelSourceError:
        raise
    except (ValueError, RuntimeError, OSError) as error:
        raise ModelSourceError(f"{source}: {' '.join(str(error).split())[:500]}") from None
    if ref.arch not in (None, arch):
        raise ModelSourceError(f"{ref.arch_field} is {ref.arch}, but {source} holds {arch}; leave it out")
    info = PinnedModel(arch=arch, num_classes=classes,
                       resolution=ref.resolution or resolution or ModelSpec(arch=arch).resolution,
                       source=source)
    pinned = out / PINNED_FILE
    save_pinned(model.state_dict(), info, pinned)
    return pinned, info


def _named_arch(path: Path) -> str | None:
    """The model a compound training run wrote into its weights file's metadata (torchvision classifiers)."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), "pt") as file:
            return (file.metadata() or {}).get("arch")
    except (safetensors.SafetensorError, OSError):  # not safetensors: a torch.save file says nothing
        return None


def _logged_model_checkpoint(uri: str, tracking_uri: str) -> str:
    """The checkpoint a compound job logged the model at `uri` from (its run's tag)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run_id = _run_id(uri, client)
        tags = client.get_run(run_id).data.tags
    except MlflowException as error:
        raise ModelSourceError(f"{uri}: MLflow at {tracking_uri} says {str(error).splitlines()[0][:300]}") from None
    checkpoint = tags.get(MODEL_TAG)
    if checkpoint is None:
        raise ModelSourceError(f"{uri} was not logged by a compound job (its run {run_id} has no "
                               f"{MODEL_TAG} tag); give its weights file instead")
    return checkpoint.rstrip("/")


def _run_id(uri: str, client) -> str:
    if uri.startswith("runs:/"):
        return uri.removeprefix("runs:/").split("/", 1)[0]
    name = uri.removeprefix("models:/")
    if "@" in name:
        model, alias = name.split("@", 1)
        return client.get_model_version_by_alias(model, alias).run_id
    model, _, version = name.partition("/")
    if not version.isdigit():
        raise ModelSourceError(f"{uri}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(model, version).run_id


def _exists(url: str, s3: S3Access) -> bool:
    bucket, key = split_s3_url(url)
    try:
        s3.client().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if is_not_found(error):
            return False
        raise ModelSourceError(f"{url}: {error}") from None
    return True


def _download(url: str, path: Path, s3: S3Access) -> None:
    bucket, key = split_s3_url(url)
    try:
        s3.client().download_file(bucket, key, str(path))
    except ClientError as error:
        found = "no such object" if is_not_found(error) else str(error)
        raise ModelSourceError(f"{url}: {found}") from None
    except BotoCoreError as error:
        raise ModelSourceError(f"{url}: the store did not answer ({error})") from None
