"""The driver of a sweep: `compound sweep run SPEC`, and the entrypoint a submitted sweep runs.

Resolves the base job (nothing starts if it or the sweep is wrong), checks that the cluster holds at
least one trial's workers (and the asked concurrency), opens the sweep's parent MLflow run and runs
the Tune experiment (`cluster.tune`). Each trial is a training job named `<sweep>-<trial id>`,
trained by the same `train_job` as any job, in its own child run of the parent: a retried or resumed
trial finds its job's checkpoints and its child run again. At the end the best trial's config,
metric and checkpoint go to `<sweep storage>/<name>/best.json` and onto the parent run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from cluster.plots import parallel_coordinates
from cluster.storage import S3Access, split_s3_url
from cluster.tracking import RunRef
from cluster.train.trainer import storage_path
from cluster.tune import EPOCHS_DONE, Sweep, epoch_report_callback, run_sweep
from infra.settings import Settings
from jobs.capacity import fits, worker_slots
from jobs.driver import connect_ray, finish_job, prepare_job, train_job
from jobs.lease import LEASE_FILE, driver, held
from jobs.resolve import ResolvedJob
from jobs.s3 import s3_access
from jobs.spec import JobSpec, SpecError, SweepSpec, dump_spec, parse_spec
from jobs.tags import PARENT_TAG, SUBMISSION_TAG, TRIAL_TAG
from jobs.tracking import mark_trial, open_sweep_run, record_sweep_result, trial_run_id

log = logging.getLogger(__name__)

SWEEP_STORAGE_PREFIX = "sweeps"  # s3://<checkpoints bucket>/sweeps/<name>/: the Tune experiment and best.json
BEST_FILE = "best.json"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what Ray's TuneReportCallback adds to a result


class SweepFailedError(RuntimeError):
    """No trial of the sweep reported its metric."""


@dataclass(frozen=True)
class SweepOutcome:
    sweep: SweepSpec
    parent: RunRef
    best: dict  # what best.json holds
    trials: list[dict]  # every trial: id, job, config, metric, epochs, status
    best_uri: str


def trial_job_name(sweep_name: str, trial_id: str) -> str:
    """A trial's job: the same on every retry and resume of the trial (Tune keeps its id)."""
    return f"{sweep_name}-{trial_id.replace('_', '-')}"


@dataclass(frozen=True)
class TrialContext:
    """What every trial's driver receives: picklable, and without S3 keys (the cluster has its own)."""

    sweep: SweepSpec
    base: ResolvedJob
    s3: S3Access
    tracking_uri: str
    parent_run_id: str

    def trial_job(self, trial_id: str, config: dict[str, Any]) -> ResolvedJob:
        """The base job with the trial's values, named after the trial and tracked under the parent."""
        data = self.sweep.trial_data(config)
        resolved = self.base.spec
        data["name"] = trial_job_name(self.sweep.name, trial_id)
        data["model"] = {**data.get("model", {}), "num_classes": resolved.model.num_classes}
        data["checkpoint"] = {**data.get("checkpoint", {}), "storage": resolved.checkpoint.storage}
        # ASHA's max_epochs is how long a trial trains (its LR schedule spans that), not a cut in its schedule.
        data["optim"] = {**data.get("optim", {}), "epochs": self.sweep.max_epochs}
        if resolved.data.sample_log is not None:  # a folder of its own per trial
            data["data"] = {**data["data"], "sample_log": f"{resolved.data.sample_log.rstrip('/')}/{data['name']}"}
        tracking = data.get("tracking", {})
        data["tracking"] = {**tracking, "experiment": self.sweep.experiment, "run_name": None,
                            "tags": {**tracking.get("tags", {}), TRIAL_TAG: trial_id, PARENT_TAG: self.parent_run_id}}
        spec = parse_spec(JobSpec, data, f"sweep {self.sweep.name}, trial {trial_id}")
        return ResolvedJob(spec=spec, dataset_ids=self.base.dataset_ids)


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """One trial: its job trained to the end (or until ASHA stops it), reporting epoch ends to Tune."""
    import ray.tune

    job = context.trial_job(ray.tune.get_context().get_trial_id(), config)
    trained = train_job(job, s3=context.s3, tracking_uri=context.tracking_uri, source=job.spec.name,
                        callbacks=[epoch_report_callback(context.sweep.metric)], in_sweep=True)
    finish_job(trained, s3=context.s3, log_model=False)  # the sweep's best checkpoint is what later stages take


class TrialRuns(Callback):
    """The driver's side of the child runs: each trial's run tagged with how the trial ended."""

    def __init__(self, tracking_uri: str, experiment_id: str, sweep_name: str, max_epochs: int) -> None:
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.sweep_name, self.max_epochs = sweep_name, max_epochs

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        done = (trial.last_result or {}).get(EPOCHS_DONE, 0)
        if done >= self.max_epochs:
            self._mark(trial, "completed", ended="FINISHED")  # its driver has marked it so, unless MLflow was down
        else:
            self._mark(trial, f"stopped early by ASHA after {done} of {self.max_epochs} epochs", ended="KILLED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._mark(trial, "failed", ended="FAILED")

    def _mark(self, trial, status: str, *, ended: str | None) -> None:
        mark_trial(self.tracking_uri, experiment_id=self.experiment_id,
                   job_name=trial_job_name(self.sweep_name, trial.trial_id), status=status, ended=ended)


def run_sweep_job(sweep: SweepSpec, settings: Settings, *, source: str,
                  submission_id: str | None = None) -> SweepOutcome:
    """Run the sweep on the configured Ray cluster to the end (resuming it if it was interrupted)."""
    base = prepare_job(sweep.base_job, settings, source=f"{source}: job")
    s3 = s3_access(settings)
    storage = f"s3://{settings.checkpoints_bucket}/{SWEEP_STORAGE_PREFIX}"
    with held(s3, f"{storage}/{sweep.name}/{LEASE_FILE}", what=f"sweep {sweep.name}",
              holder=driver(submission_id, "compound sweep run")):  # one driver per sweep
        return _run_sweep(sweep, settings, base=base, s3=s3, storage=storage, source=source,
                          submission_id=submission_id)


def _run_sweep(sweep: SweepSpec, settings: Settings, *, base: ResolvedJob, s3: S3Access, storage: str, source: str,
               submission_id: str | None) -> SweepOutcome:
    connected_here = connect_ray(settings)
    import ray

    try:
        concurrent = check_concurrency(sweep, base.spec, [node["Resources"] for node in ray.nodes() if node["Alive"]],
                                       source)
        params = {f"space.{path}": dimension.describe() for path, dimension in sweep.space.items()}
        params |= {"job": base.spec.name, "trials": str(sweep.trials), "metric": sweep.metric, "mode": sweep.mode,
                   "searcher": sweep.searcher.name, "searcher.seed": str(sweep.searcher.seed),
                   "scheduler": "asha", "scheduler.grace_period": str(sweep.scheduler.grace_period),
                   "scheduler.reduction_factor": str(sweep.scheduler.reduction_factor),
                   "scheduler.max_epochs": str(sweep.max_epochs), "max_concurrent_trials": str(concurrent)}
        tags = {**sweep.tracking.tags, "mlflow.note.content": _describe(sweep, concurrent)}
        if submission_id is not None:
            tags[SUBMISSION_TAG] = submission_id
        parent = open_sweep_run(settings.mlflow_tracking_uri, experiment=sweep.experiment, sweep_name=sweep.name,
                                params=params, tags=tags, spec_yaml=dump_spec(sweep))
        log.info("sweep %s: MLflow parent run %s; up to %d trial(s) at once", sweep.name, parent.url, concurrent)
        context = TrialContext(sweep=sweep, base=base, s3=s3.without_keys(), tracking_uri=settings.mlflow_tracking_uri,
                               parent_run_id=parent.run_id)
        with _s3_environment(settings):  # the experiment's filesystem carries no keys: it is saved with it
            plan = Sweep(name=sweep.name, storage_path=storage_path(storage), filesystem=s3.without_keys().filesystem(),
                         space=sweep.space, searcher=sweep.searcher, scheduler=sweep.scheduler,
                         max_epochs=sweep.max_epochs, trials=sweep.trials, metric=sweep.metric, mode=sweep.mode,
                         max_concurrent_trials=concurrent, max_failures=base.spec.failure.max_failures,
                         callbacks=[TrialRuns(settings.mlflow_tracking_uri, parent.experiment_id, sweep.name,
                                              sweep.max_epochs)])
            results = run_sweep(plan, run_trial, context=context)
    finally:
        if connected_here:
            ray.shutdown()
    trials = _trials(sweep, results)
    best = _best(sweep, trials, parent)
    best_uri = f"{storage}/{sweep.name}/{BEST_FILE}"
    bucket, key = split_s3_url(best_uri)
    s3.client().put_object(Bucket=bucket, Key=key, Body=json.dumps(best, indent=2).encode(),
                           ContentType="application/json")
    plot = parallel_coordinates([{**t["config"], sweep.metric: t["value"]} for t in trials if t["value"] is not None],
                                list(sweep.space), sweep.metric, title=f"sweep {sweep.name}")
    record_sweep_result(parent, best=best, trials=trials, plot=plot)
    return SweepOutcome(sweep=sweep, parent=parent, best=best, trials=trials, best_uri=best_uri)


def check_concurrency(sweep: SweepSpec, job: JobSpec, nodes: list[dict[str, float]], source: str) -> int:
    """How many trials run at once: the asked number, or as many as the cluster holds with every one's
    workers placed; `SpecError` when even one trial, or the asked number, can never fit."""
    problem = fits(job, nodes)
    if problem is not None:
        raise SpecError(source, [f"job.scaling: a trial can never run on the cluster: {problem}"])
    room = math.floor(worker_slots(job, nodes) / job.scaling.max_workers)
    asked = sweep.max_concurrent_trials
    if asked is not None and asked > room:
        raise SpecError(source, [(
            f"max_concurrent_trials: {asked}, but the cluster holds at most {room} trial(s) of "
            f"{job.scaling.max_workers} workers at once; more would hold the trials' drivers while their workers "
            "wait for room. Lower it, or leave it out to run as many as fit")])
    return min(asked or room, sweep.trials)


def _trials(sweep: SweepSpec, results) -> list[dict]:
    """Every trial with a result: its config, its last value of the metric, and how far it trained."""
    trials = []
    for result in results:
        metrics = result.metrics or {}
        if "trial_id" not in metrics:
            continue
        done = metrics.get(EPOCHS_DONE, 0)
        status = "failed" if result.error else "completed" if done >= sweep.max_epochs else "stopped early"
        checkpoint = metrics.get(CHECKPOINT_PATH_KEY)
        trials.append({"trial": metrics["trial_id"], "job": trial_job_name(sweep.name, metrics["trial_id"]),
                       "config": {path: result.config[path] for path in sweep.space},
                       "value": metrics.get(sweep.metric), "epochs": done, "status": status,
                       "checkpoint": f"s3://{checkpoint}" if checkpoint else None})
    return sorted(trials, key=lambda t: t["trial"])


def _best(sweep: SweepSpec, trials: list[dict], parent: RunRef) -> dict:
    """The trial with the best last value of the metric (a trial ASHA stopped is judged where it stopped)."""
    scored = [t for t in trials if t["value"] is not None and math.isfinite(t["value"]) and t["checkpoint"]]
    if not scored:
        raise SweepFailedError(f"sweep {sweep.name}: no trial reported {sweep.metric}; see the trials' child runs "
                               f"in MLflow ({parent.url})")
    best = (max if sweep.mode == "max" else min)(scored, key=lambda t: t["value"])
    return {"sweep": sweep.name, "trial": best["trial"], "job": best["job"], "config": best["config"],
            "metric": sweep.metric, "mode": sweep.mode, "value": best["value"], "epochs": best["epochs"],
            "checkpoint": best["checkpoint"], "parent_run_id": parent.run_id,
            "mlflow_run_id": trial_run_id(parent.tracking_uri, experiment_id=parent.experiment_id, job_name=best["job"])}


def _describe(sweep: SweepSpec, concurrent: int) -> str:
    return (f"{sweep.trials} trials of job {sweep.base_job.name} over {', '.join(sweep.space)}; "
            f"{sweep.searcher.name} search, ASHA on {sweep.metric} ({sweep.mode}) from epoch "
            f"{sweep.scheduler.grace_period} of {sweep.max_epochs}; up to {concurrent} at once.")


@contextlib.contextmanager
def _s3_environment(settings: Settings):
    """This process's S3 keys in its environment, where a keyless pyarrow filesystem finds them."""
    saved = {key: os.environ.get(key) for key in settings.s3_env()}
    os.environ.update(settings.s3_env())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
