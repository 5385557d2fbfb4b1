"""Run a pipeline: its stages in order, each stage's inputs wired from earlier outputs, in one MLflow
parent run that records every stage's outputs.

A pipeline run is an MLflow run tagged `compound.pipeline=<name>`; each stage's record (status,
inputs fingerprint, attempt, outputs, error) is a tag `compound.stage.<stage>` on it. Running the
pipeline again after a run failed (or its driver died) resumes that run: a finished stage whose
inputs are unchanged is reused; the failed stage runs again under the same job name, so a training
job continues from its checkpoints. `from_stage` re-runs that stage and every stage after it anew.
A finished run is never resumed: running again starts a new run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass

from cluster.data.manifest import ShardManifest
from cluster.tracking import RunRef
from infra.settings import Settings
from jobs.lease import LEASE_FILE, LeaseHeld, driver, held
from jobs.s3 import s3_access
from jobs.spec import SpecError, dump_spec
from jobs.tags import CODE_VERSION_TAG, SUBMISSION_TAG
from pipelines.spec import PipelineSpec, stage_inputs
from pipelines.stages import STAGES
from pipelines.stages.base import PIPELINE_STORAGE_PREFIX, PIPELINE_TAG, StageContext

log = logging.getLogger(__name__)

STAGE_RECORD_PREFIX = "compound.stage."  # + stage name: the stage's record on the parent run (JSON)
DATA_TAG = "compound.pipeline_data"
ORDER_TAG = "compound.pipeline_stages"  # the stages in the order they run, comma-separated
UNFINISHED = ("RUNNING", "FAILED", "KILLED", "SCHEDULED")


class StageFailedError(RuntimeError):
    """A stage raised; the pipeline run is marked failed and resumes at this stage when run again."""


@dataclass(frozen=True)
class StageRecord:
    status: str  # running | finished | failed
    fingerprint: str  # of the stage's inputs, references substituted
    attempt: int
    outputs: dict | None = None
    error: str | None = None
    seconds: float | None = None

    def to_json(self) -> str:
        return json.dumps({key: value for key, value in self.__dict__.items() if value is not None},
                          separators=(",", ":"), default=str)


@dataclass(frozen=True)
class PipelineOutcome:
    spec: PipelineSpec
    run: RunRef
    outputs: dict[str, dict]  # stage → its outputs
    reused: list[str]  # stages whose outputs came from an earlier attempt of this run
    resumed: bool


def run_pipeline(spec: PipelineSpec, settings: Settings, *, from_stage: str | None = None,
                 submission_id: str | None = None) -> PipelineOutcome:
    """Run (or resume) the pipeline against the configured cluster, store and tracking server."""
    if from_stage is not None and from_stage not in spec.stages:
        raise SpecError("--from", [f"no stage {from_stage!r}; stages: {', '.join(spec.stages)}"])
    dataset = check_data(spec, settings)
    check_models(spec, settings)
    folder = f"s3://{settings.checkpoints_bucket}/{PIPELINE_STORAGE_PREFIX}/{spec.name}"
    lease = held(s3_access(settings), f"{folder}/{LEASE_FILE}", what=f"pipeline {spec.name}",
                 holder=driver(submission_id, "compound pipeline run"))
    with lease as mine:  # one driver per pipeline: its runs share stage names, jobs and storage
        return _run_stages(spec, settings, from_stage=from_stage, submission_id=submission_id, dataset=dataset,
                           lost=mine.lost)


def _run_stages(spec: PipelineSpec, settings: Settings, *, from_stage: str | None, submission_id: str | None,
                dataset, lost) -> PipelineOutcome:
    parent, records, resumed = open_pipeline_run(spec, settings.mlflow_tracking_uri, from_stage=from_stage,
                                                 submission_id=submission_id, dataset=dataset)
    log.info("pipeline %s: MLflow run %s%s", spec.name, parent.url, " (resumed)" if resumed else "")
    forced = spec.downstream(from_stage) if from_stage else set()
    outputs: dict[str, dict] = {}
    reused: list[str] = []
    for name in spec.order():
        uses = spec.stages[name].uses
        inputs = stage_inputs(spec, name, lambda text: _lookup(spec, outputs, text))
        fingerprint = hashlib.sha256(f"{uses}:{inputs.model_dump_json()}".encode()).hexdigest()[:16]
        record = records.get(name)
        if record and record.status == "finished" and record.fingerprint == fingerprint and name not in forced:
            log.info("stage %s: finished before, reused", name)
            outputs[name] = record.outputs or {}
            reused.append(name)
            continue
        if lost.is_set():  # another driver took this one's lease (it could not renew it for minutes)
            raise LeaseHeld(f"pipeline {spec.name}: another driver took over its lease; stopped before stage {name}")
        context = StageContext(settings=settings, pipeline=spec.name, experiment=spec.experiment_name, stage=name,
                               parent=parent, attempt=_attempt(record, fingerprint, forced=name in forced))
        outputs[name] = _run_stage(spec, context, inputs, fingerprint)
    _finish(parent, outputs)
    return PipelineOutcome(spec=spec, run=parent, outputs=outputs, reused=reused, resumed=resumed)


def _attempt(record: StageRecord | None, fingerprint: str, *, forced: bool) -> int:
    """A stage resumed after a failure keeps its attempt (its job continues from its checkpoints); one whose
    inputs changed, or that is forced, starts a new one (new job names)."""
    if record is None:
        return 0
    return record.attempt + 1 if forced or record.fingerprint != fingerprint else record.attempt


def _run_stage(spec: PipelineSpec, context: StageContext, inputs, fingerprint: str) -> dict:
    """One stage, its record kept on the pipeline run; a failure marks the run failed (killed, for ^C)."""
    name, uses, parent = context.stage, spec.stages[context.stage].uses, context.parent
    _record(parent, name, StageRecord("running", fingerprint, context.attempt))
    log.info("stage %s (%s): running", name, uses)
    started = time.monotonic()
    try:
        result = STAGES[uses].run(inputs, context)
    except BaseException as error:
        _record(parent, name, StageRecord("failed", fingerprint, context.attempt, error=_summary(error),
                                          seconds=time.monotonic() - started))
        _terminate(parent, "FAILED" if isinstance(error, Exception) else "KILLED")
        if isinstance(error, Exception):
            raise StageFailedError(f"pipeline {spec.name}: stage {name} ({uses}) failed: {_summary(error)}\n"
                                   f"run the pipeline again to resume at this stage; MLflow run: {parent.url}") \
                from error
        raise
    outputs = result.model_dump(mode="json")
    _record(parent, name, StageRecord("finished", fingerprint, context.attempt, outputs=outputs,
                                      seconds=time.monotonic() - started))
    log.info("stage %s: finished in %.0f s", name, time.monotonic() - started)
    return outputs


def check_data(spec: PipelineSpec, settings: Settings) -> tuple[ShardManifest, str]:
    """The pipeline's dataset manifest and id; a pipeline whose manifest cannot be read is refused before
    anything runs or is recorded."""
    from cluster.data.manifest import ManifestError, load_manifest

    try:
        return load_manifest(spec.data, s3=s3_access(settings))
    except (ManifestError, ValueError) as error:
        raise SpecError(f"pipeline {spec.name}", [f"data: {error}"]) from None


def check_models(spec: PipelineSpec, settings: Settings) -> None:
    """The models the pipeline names itself (not outputs of its stages) are there: a teacher in the
    registry that is not, refused before the stages ahead of it train."""
    from jobs.model_source import ModelSourceError, check_source
    from pipelines.graph import references
    from pipelines.stages import STAGES

    s3, problems = s3_access(settings), []
    for name, stage in spec.stages.items():
        for field in getattr(STAGES.get(stage.uses), "MODEL_INPUTS", ()):
            value = stage.with_.get(field)
            named = value if isinstance(value, dict) else {None: value}
            for label, source in named.items():
                if not isinstance(source, str) or references(source):
                    continue  # an output of a stage before it, there when that stage is
                try:
                    check_source(source, s3=s3, tracking_uri=settings.mlflow_tracking_uri)
                except ModelSourceError as error:
                    path = f"stages.{name}.with.{field}" + (f".{label}" if label else "")
                    problems.append(f"{path}: {error}")
    if problems:
        raise SpecError(f"pipeline {spec.name}", problems)


def open_pipeline_run(spec: PipelineSpec, tracking_uri: str, *, from_stage: str | None, submission_id: str | None,
                      dataset: tuple[ShardManifest, str]) -> tuple[RunRef, dict[str, StageRecord], bool]:
    """The pipeline run to continue (the latest, if it did not finish; with `from_stage`, the latest
    whatever its status) or a new one, with its dataset (manifest, id) as an input; its stage records;
    whether it was continued."""
    from mlflow import MlflowClient

    from jobs.tracking import code_version, experiment_id_of, log_dataset_input, log_tags

    client = MlflowClient(tracking_uri)
    experiment_id = experiment_id_of(client, spec.experiment_name)
    latest = latest_runs(client, experiment_id, spec.name, max_results=1)
    resumable = latest and (from_stage is not None or latest[0].info.status in UNFINISHED) and \
        latest[0].data.tags.get(DATA_TAG) == spec.data
    if resumable:
        run = latest[0]
        client.update_run(run.info.run_id, status="RUNNING")
    else:
        run = client.create_run(experiment_id, run_name=f"{spec.name} {time.strftime('%Y-%m-%d %H:%M')}",
                                tags={PIPELINE_TAG: spec.name})
        client.log_param(run.info.run_id, "data", spec.data)
        log_dataset_input(client, run.info.run_id, spec.data, *dataset, context="training")
    tags = {PIPELINE_TAG: spec.name, DATA_TAG: spec.data, ORDER_TAG: ",".join(spec.order()),
            CODE_VERSION_TAG: code_version(),
            "mlflow.source.name": f"compound {code_version()}", "mlflow.source.type": "PROJECT",
            "mlflow.note.content": describe(spec)}
    if submission_id is not None:
        tags[SUBMISSION_TAG] = submission_id
    log_tags(client, run.info.run_id, tags)
    client.log_text(run.info.run_id, dump_spec(spec), "pipeline.yaml")
    records = stage_records(run.data.tags) if resumable else {}
    ref = RunRef(tracking_uri=tracking_uri, experiment_id=experiment_id, run_id=run.info.run_id,
                 started_s=run.info.start_time / 1000)
    return ref, records, bool(resumable)


def latest_runs(client, experiment_id: str, pipeline: str, *, max_results: int = 20) -> list:
    """The pipeline's runs, newest first."""
    return client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_TAG}` = '{quoted(pipeline)}' "
                              f"and tags.`{DATA_TAG}` LIKE 's3://%'", order_by=["attributes.start_time DESC"],
                              max_results=max_results)


def quoted(value: str) -> str:
    """A value for an MLflow search filter's quotes."""
    return value.replace("'", "\\'")


def stage_records(tags: dict[str, str]) -> dict[str, StageRecord]:
    return {key.removeprefix(STAGE_RECORD_PREFIX): StageRecord(**json.loads(value))
            for key, value in tags.items() if key.startswith(STAGE_RECORD_PREFIX)}


def describe(spec: PipelineSpec) -> str:
    return f"pipeline {spec.name} on {spec.data}: " + " → ".join(
        f"{name} ({spec.stages[name].uses})" for name in spec.order())


def _lookup(spec: PipelineSpec, outputs: dict[str, dict], text: str):
    from pipelines.graph import DATA_REFERENCE, STAGE_REFERENCE

    if text == DATA_REFERENCE:
        return spec.data
    stage, output = STAGE_REFERENCE.match(text).groups()
    return outputs[stage] if output is None else outputs[stage][output]


def _record(parent: RunRef, stage: str, record: StageRecord) -> None:
    from mlflow import MlflowClient

    text = record.to_json()
    if len(text) > 5000:  # MLflow's limit on a tag value: keep the record whole, shorten the error
        record = StageRecord(**{**record.__dict__, "error": (record.error or "")[:1000]})
        text = record.to_json()
    MlflowClient(parent.tracking_uri).set_tag(parent.run_id, f"{STAGE_RECORD_PREFIX}{stage}", text)


def _terminate(parent: RunRef, status: str) -> None:
    from jobs.tracking import finish_run

    finish_run(parent, status=status, required=False)


def _finish(parent: RunRef, outputs: dict[str, dict]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(parent.tracking_uri)
    client.log_text(parent.run_id, json.dumps(outputs, indent=2), "outputs.json")
    for key, value in summary_metrics(outputs).items():
        client.log_metric(parent.run_id, key, value)
    client.set_terminated(parent.run_id, status="FINISHED")


def summary_metrics(outputs: dict[str, dict]) -> dict[str, float]:
    """The stages' figures as metrics of the pipeline run, where the UI's run table and charts show them:
    each number a stage returned as `<stage>/<output>`, an evaluate stage's as `<stage>/<model>_<figure>`."""
    metrics = {}
    for stage, values in outputs.items():
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"{stage}/{key}"] = float(value)
            elif key == "figures" and isinstance(value, dict):
                metrics |= {f"{stage}/{label}_{name}": float(number) for label, figures in value.items()
                            for name, number in figures.items()}
    return metrics


def _summary(error: BaseException) -> str:
    """What went wrong, for a person: a spec's every problem, otherwise the error's first line."""
    if isinstance(error, SpecError):
        return str(error)[:2000]
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__
