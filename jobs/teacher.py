"""A distillation job's teacher, found from what its spec names and pinned beside the job's checkpoints.

`distill.teacher` may be:
- `s3://…/<checkpoint folder>`: a compound job's checkpoint (its weights and the spec it trained with),
  or `s3://…/<file>`: a weights file in the store;
- `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID/…`: a model a compound job logged to
  MLflow, followed to the checkpoint it was made from;
- a local weights file: a compound checkpoint, or a torchvision/timm state dict (`distill.teacher_arch`
  names its model when the file does not).

The teacher is read and checked when the job is resolved (nothing starts with a teacher that does not
fit), and pinned (`TEACHER_FILE` in `<storage>/<job>/`) when the job is launched: every worker and
every restart distils from those weights, wherever the source points later.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from cluster.storage import S3Access, is_not_found, split_s3_url
from cluster.train.checkpoint import PROGRESS_FILE, WEIGHTS_FILE
from cluster.train.config import DistillSpec, ModelSpec, TrainingSpec
from cluster.train.distill import TEACHER_FILE, TeacherInfo, save_teacher, teacher_info, teacher_url
from cluster.train.models import build_model
from effnet import VARIANTS


class TeacherError(ValueError):
    """The teacher named by a spec cannot be used; the message says why and what to give instead."""


def resolve_teacher(spec: TrainingSpec, *, s3: S3Access, tracking_uri: str) -> DistillSpec:
    """The spec's distill section with the teacher's model and resolution filled in, after checking that
    the teacher loads and predicts the student's classes. A job launched before keeps its pinned teacher."""
    distill = spec.distill
    assert distill is not None and spec.model.num_classes is not None
    with tempfile.TemporaryDirectory(prefix="compound-teacher-") as directory:
        info = _pinned(spec, s3, Path(directory)) or _fetch(distill, spec.model.num_classes, s3=s3,
                                                            tracking_uri=tracking_uri, out=Path(directory))[1]
    if info.num_classes != spec.model.num_classes:
        raise TeacherError(f"the teacher predicts {info.num_classes} classes, the student "
                           f"{spec.model.num_classes}; distil from a teacher trained on the same classes")
    if distill.features is not None and info.arch not in VARIANTS:
        raise TeacherError(f"distill.features needs an EfficientNet teacher, not {info.arch}; remove distill.features")
    return replace_distill(distill, info)


def pin_teacher(spec: TrainingSpec, *, s3: S3Access, tracking_uri: str) -> str:
    """Copy the resolved spec's teacher into the job's storage, unless it is there: its URL."""
    distill = spec.distill
    assert distill is not None and spec.model.num_classes is not None
    url = teacher_url(spec)
    with tempfile.TemporaryDirectory(prefix="compound-teacher-") as directory:
        if _pinned(spec, s3, Path(directory)) is None:
            path, _ = _fetch(distill, spec.model.num_classes, s3=s3, tracking_uri=tracking_uri, out=Path(directory))
            bucket, key = split_s3_url(url)
            s3.client().upload_file(str(path), bucket, key)
    return url


def replace_distill(distill: DistillSpec, info: TeacherInfo) -> DistillSpec:
    return distill.model_copy(update={"teacher_arch": info.arch, "teacher_resolution": info.resolution})


def _pinned(spec: TrainingSpec, s3: S3Access, out: Path) -> TeacherInfo | None:
    """The teacher this job pinned at an earlier launch, if it came from the same source."""
    bucket, key = split_s3_url(teacher_url(spec))
    path = out / TEACHER_FILE
    try:
        s3.client().download_file(bucket, key, str(path))
    except ClientError as error:
        if is_not_found(error):
            return None
        raise
    info = teacher_info(path)
    return info if info.source == spec.distill.teacher else None


def _fetch(distill: DistillSpec, num_classes: int, *, s3: S3Access, tracking_uri: str,
           out: Path) -> tuple[Path, TeacherInfo]:
    """The teacher named by `distill.teacher` as a pinned-format file in `out`, and what it is."""
    source = distill.teacher
    if source.startswith(("models:/", "runs:/")):
        checkpoint = _logged_model_checkpoint(source, tracking_uri)
        return _from_checkpoint(checkpoint, distill, num_classes, s3=s3, out=out, source=source)
    if source.startswith("s3://"):
        if _exists(f"{source.rstrip('/')}/{PROGRESS_FILE}", s3):
            return _from_checkpoint(source.rstrip("/"), distill, num_classes, s3=s3, out=out, source=source)
        local = out / "weights"
        _download(source, local, s3)
        return _from_file(local, distill, num_classes, resolution=None, out=out, source=source)
    if "://" in source:
        raise TeacherError(f"{source}: give an s3:// checkpoint or file, a models:/ or runs:/ MLflow URI, "
                           "or a local weights file")
    path = Path(source).expanduser()
    if not path.is_file():
        raise TeacherError(f"{source}: no such file here; give an s3:// checkpoint or file, a models:/ or "
                           "runs:/ MLflow URI, or a local weights file")
    return _from_file(path, distill, num_classes, resolution=None, out=out, source=source)


def _from_checkpoint(checkpoint: str, distill: DistillSpec, num_classes: int, *, s3: S3Access, out: Path,
                     source: str) -> tuple[Path, TeacherInfo]:
    """A compound job's checkpoint folder: its weights, at the resolution and model its spec trained."""
    progress = out / PROGRESS_FILE
    _download(f"{checkpoint}/{PROGRESS_FILE}", progress, s3)
    trained = json.loads(progress.read_text())["spec"]["model"]
    weights = out / WEIGHTS_FILE
    try:
        _download(f"{checkpoint}/{WEIGHTS_FILE}", weights, s3)
    except TeacherError:
        raise TeacherError(f"{checkpoint} is a checkpoint taken mid-epoch, without weights of their own; "
                           "give an epoch-end checkpoint (a job's latest at its end)") from None
    arch = distill.teacher_arch or trained["arch"]
    if arch != trained["arch"]:
        raise TeacherError(f"distill.teacher_arch is {arch}, but {checkpoint} trained {trained['arch']}; leave it out")
    return _from_file(weights, distill.model_copy(update={"teacher_arch": arch}), num_classes,
                      resolution=trained["resolution"], out=out, source=source)


def _from_file(path: Path, distill: DistillSpec, num_classes: int, *, resolution: int | None, out: Path,
               source: str) -> tuple[Path, TeacherInfo]:
    """Load a weights file as the teacher (its head must have `num_classes`) and write it pinned."""
    from effnet.weights import is_compound_checkpoint, load_checkpoint, load_weights, read_state_dict

    try:
        if is_compound_checkpoint(path):  # an EfficientNet that knows its own head
            model = load_checkpoint(path)
            arch, classes = model.spec.name, model.spec.num_classes
        else:
            arch, classes = distill.teacher_arch or _named_arch(path), num_classes
            if arch is None:
                raise TeacherError(f"{source} does not say which model it holds; name it with distill.teacher_arch")
            if arch in VARIANTS:
                model = load_weights(path, arch, num_classes=num_classes)
            else:
                model = build_model(ModelSpec(arch=arch, num_classes=num_classes))
                missing, unexpected = model.load_state_dict(read_state_dict(path), strict=False)
                if missing or unexpected:
                    raise TeacherError(f"{source} does not hold {arch} weights: {len(missing)} missing keys "
                                       f"({', '.join(missing[:3])}), {len(unexpected)} unexpected "
                                       f"({', '.join(unexpected[:3])}); give distill.teacher_arch its model")
    except TeacherError:
        raise
    except (ValueError, RuntimeError, OSError) as error:
        raise TeacherError(f"{source}: {' '.join(str(error).split())[:500]}") from None
    if distill.teacher_arch is not None and distill.teacher_arch != arch:
        raise TeacherError(f"distill.teacher_arch is {distill.teacher_arch}, but {source} holds {arch}; leave it out")
    info = TeacherInfo(arch=arch, num_classes=classes,
                       resolution=distill.teacher_resolution or resolution or ModelSpec(arch=arch).resolution,
                       source=source)
    pinned = out / TEACHER_FILE
    save_teacher(model.state_dict(), info, pinned)
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

    from jobs.tracking import MODEL_TAG  # jobs.tracking imports the resolver, which imports this

    client = MlflowClient(tracking_uri)
    try:
        run_id = _run_id(uri, client)
        tags = client.get_run(run_id).data.tags
    except MlflowException as error:
        raise TeacherError(f"{uri}: MLflow at {tracking_uri} says {str(error).splitlines()[0][:300]}") from None
    checkpoint = tags.get(MODEL_TAG)
    if checkpoint is None:
        raise TeacherError(f"{uri} was not logged by a compound job (its run {run_id} has no "
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
        raise TeacherError(f"{uri}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    return client.get_model_version(model, version).run_id


def _exists(url: str, s3: S3Access) -> bool:
    bucket, key = split_s3_url(url)
    try:
        s3.client().head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if is_not_found(error):
            return False
        raise TeacherError(f"{url}: {error}") from None
    return True


def _download(url: str, path: Path, s3: S3Access) -> None:
    bucket, key = split_s3_url(url)
    try:
        s3.client().download_file(bucket, key, str(path))
    except ClientError as error:
        found = "no such object" if is_not_found(error) else str(error)
        raise TeacherError(f"{url}: {found}") from None
    except BotoCoreError as error:
        raise TeacherError(f"{url}: the store did not answer ({error})") from None
