"""`compound sweep` against the real local stack: a CPU sweep in which ASHA stops trials early, seen in
MLflow as one parent run with one child run per trial; the sweep's driver killed mid-sweep and run
again; bad sweep specs refused before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from cluster.data.manifest import ShardManifest
from cluster.storage import S3Access, split_s3_url
from compound.cli import cli
from infra.settings import Settings
from infra.stack import Stack
from jobs.spec import SpecError, load_sweep_spec
from jobs.sweep import BEST_FILE, SWEEP_STORAGE_PREFIX, check_concurrency
from tests.jobs.helpers import (
    COMPOUND,
    RUN_TIMEOUT_S,
    SMALL,
    check_lineage,
    latest_uploaded,
    make_spec,
    split_keys,
    submit,
    wait_for,
)

SWEEP_TIMEOUT_S = 600
# A trial at BAD_LR has barely moved after an epoch, one at GOOD_LR has: ranked by training loss (validation
# accuracy of this tiny model after one or two epochs is too close to chance to rank them), ASHA stops the
# bad trials that come after a good one. The random searcher's seed fixes which come first.
GOOD_LR, BAD_LR = 1.0e-3, 1.0e-7


def _sweep(tmp_path: Path, job_spec: Path, **changes) -> tuple[Path, dict]:
    """A sweep of the (quick) smoke job over LR, warm-up and weight decay, under a fresh name."""
    sweep = {
        "name": f"sweep-{uuid.uuid4().hex[:6]}",
        "job": job_spec.name,
        "space": {"optim.lr": {"choice": [GOOD_LR, BAD_LR]}, "optim.warmup_epochs": {"uniform": [0.0, 0.2]},
                  "optim.weight_decay": {"loguniform": [0.001, 0.1]}},
        "searcher": {"name": "random", "seed": 1},
        "metric": "train_loss",
        "mode": "min",
        "scheduler": {"grace_period": 1, "reduction_factor": 2},
        "trials": 4,
        **changes,
    }
    path = tmp_path / f"{sweep['name']}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path, sweep


def _run(spec_path: Path, stack: Stack) -> subprocess.Popen:
    return subprocess.Popen([COMPOUND, "sweep", "run", str(spec_path), "--json", "--home", str(stack.home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=SWEEP_TIMEOUT_S)
    assert process.returncode == 0, err[-6000:]
    return json.loads([line for line in out.splitlines() if line.startswith('{"sweep"')][-1])


def _children(client: MlflowClient, parent) -> list:
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def _parent(client: MlflowClient, experiment: str, name: str):
    found = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([found.experiment_id], filter_string=f"tags.`compound.sweep` = '{name}'")
    return parent


def _read_best(sweep_name: str, s3: S3Access, settings: Settings) -> dict:
    """The best trial the sweep recorded for later stages."""
    key = f"{SWEEP_STORAGE_PREFIX}/{sweep_name}/{BEST_FILE}"
    return json.loads(s3.client().get_object(Bucket=settings.checkpoints_bucket, Key=key)["Body"].read())


def test_a_sweep_stops_bad_trials_early_and_is_one_parent_run_with_a_child_per_trial(
    stack: Stack, settings: Settings, s3: S3Access, digits: ShardManifest, tmp_path: Path,
) -> None:
    # At the smoke job's 64 px: at 32 px, a first epoch at GOOD_LR can average a higher loss than an
    # untrained model (its early steps overshoot), and whether it does depends on the sample order.
    job_path, _ = make_spec(tmp_path, optim={"epochs": 2})
    spec_path, sweep = _sweep(tmp_path, job_path, trials=2)  # one at a time: a good one, then a bad one
    outcome = _finish(_run(spec_path, stack))

    trials = outcome["trials"]
    assert len(trials) == 2 and len({t["trial"] for t in trials}) == 2
    stopped = [t for t in trials if t["status"] == "stopped early"]
    assert stopped and all(t["epochs"] == 1 for t in stopped), trials
    assert all(t["epochs"] == 2 for t in trials if t["status"] == "completed")
    best = outcome["best"]
    assert best["value"] == min(t["value"] for t in trials) and best["config"]["optim.lr"] == GOOD_LR
    assert _read_best(sweep["name"], s3, settings) == best
    bucket, key = split_s3_url(f"{best['checkpoint']}/progress.json")
    assert json.loads(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())["spec"]["name"] == best["job"]

    client = MlflowClient(settings.mlflow_tracking_uri)
    parent = _parent(client, "smoke", sweep["name"])  # the base job's experiment
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.optim.lr"] == f"choice({GOOD_LR!r}, {BAD_LR!r})"
    assert parent.data.params["searcher"] == "random" and parent.data.params["scheduler.grace_period"] == "1"
    assert float(parent.data.params["best.optim.lr"]) == GOOD_LR
    assert parent.data.metrics[f"best_{best['metric']}"] == pytest.approx(best["value"])
    assert parent.data.tags["compound.best_checkpoint"] == best["checkpoint"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/parallel_coordinates.png" in artifacts

    children = _children(client, parent)
    by_trial = {c.data.tags["compound.trial"]: c for c in children}
    assert len(children) == 2 and set(by_trial) == {t["trial"] for t in trials}, "one child run per trial"
    for trial in trials:
        child = by_trial[trial["trial"]]
        assert child.data.tags["compound.job"] == trial["job"]
        assert float(child.data.params["optim.lr"]) == trial["config"]["optim.lr"]
        samples = client.get_metric_history(child.info.run_id, "train_samples_epoch")
        assert [m.step for m in samples] == list(range(1, trial["epochs"] + 1))
        if trial["status"] == "stopped early":
            assert child.info.status == "KILLED" and "stopped early by ASHA" in child.data.tags["compound.trial_status"]
        else:
            assert child.info.status == "FINISHED" and child.data.tags["compound.trial_status"] == "completed"
    assert best["mlflow_run_id"] == by_trial[best["trial"]].info.run_id


@pytest.mark.slow  # CI's budget: the drill is in `make test-all`; a pipeline's resume runs in `make test`
def test_a_sweep_whose_driver_was_killed_resumes_when_submitted_without_running_finished_trials_again(
    stack: Stack, settings: Settings, s3: S3Access, digits: ShardManifest, tmp_path: Path,
) -> None:
    job_path, job = make_spec(tmp_path, **SMALL)
    spec_path, sweep = _sweep(tmp_path, job_path, trials=2, space={"optim.lr": {"choice": [GOOD_LR]},
                                                                   "optim.warmup_epochs": {"uniform": [0.0, 0.5]}})
    logs = Path(job["data"]["sample_log"])

    def trial_logs() -> list[Path]:
        return sorted(p for p in logs.glob(f"{sweep['name']}-*") if list(p.glob("rank-*.jsonl")))

    def records(folder: Path) -> list[dict]:
        return [json.loads(line) for f in sorted(folder.glob("rank-*.jsonl")) for line in f.read_text().splitlines()
                if line.endswith("}")]

    def uploaded_points() -> dict[str, tuple[int, int]]:
        """Each trial's newest uploaded checkpoint, by its job's name."""
        return {folder.name: latest_uploaded(s3, {"name": folder.name, "scaling": job["scaling"]})
                for folder in trial_logs()}

    def one_done_one_midway() -> bool:
        points = sorted(uploaded_points().values())
        return len(points) == 2 and points[0] > (0, 0) and points[1] == (1, 0)

    first = _run(spec_path, stack)
    # One trial at a time (2 workers on 2 CPUs; Tune picks which first): one has finished its epoch, the
    # other has a mid-epoch checkpoint.
    wait_for(one_done_one_midway, "one trial done and the other midway", first, timeout_s=RUN_TIMEOUT_S)
    points = uploaded_points()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = {folder.name: {r["pid"] for r in records(folder)} for folder in trial_logs()}
    done, midway = sorted(points, key=points.get, reverse=True)

    # Run again as a submitted sweep: its driver is a Ray job on the cluster.
    resumed = submit(spec_path, stack, settings, group="sweep")
    assert resumed.wait() == "SUCCEEDED", resumed.logs()[-6000:]
    assert {r["pid"] for r in records(logs / done)} == before[done], "a finished trial ran again"
    new = [r for r in records(logs / midway) if r["pid"] not in before[midway]]
    assert new and min((r["epoch"], r["step"]) for r in new) > points[midway], "the interrupted trial did not resume"
    check_lineage(records(logs / midway), split_keys(digits, s3), epochs=1)

    client = MlflowClient(settings.mlflow_tracking_uri)
    parent = _parent(client, "smoke", sweep["name"])
    children = _children(client, parent)
    assert sorted(c.data.tags["compound.job"] for c in children) == sorted([done, midway])
    assert [c.data.tags["compound.trial_status"] for c in children] == ["completed", "completed"]
    assert parent.info.status == "FINISHED" and _read_best(sweep["name"], s3, settings)["job"] in (done, midway)


@pytest.mark.parametrize(("space", "expected"), [
    ({"optim.learning_rate": {"uniform": [0.001, 0.01]}}, "space.optim.learning_rate: no field 'learning_rate'"),
    ({"optim.lr": {"choice": []}}, "space.optim.lr.choice: List should have at least 1 item"),
    ({"optim.lr": {"loguniform": [0.0, 0.01]}}, "loguniform: both bounds must be positive"),
    ({"optim.label_smoothing": {"uniform": [0.0, 1.5]}}, "optim.label_smoothing: Input should be less than 1"),
    ({"scaling.num_workers": {"choice": [1, 2]}}, "space.scaling.num_workers: every trial keeps the base job's"),
])
def test_bad_sweep_specs_are_refused_naming_the_field(tmp_path: Path, space: dict, expected: str) -> None:
    job_path, _ = make_spec(tmp_path)
    spec_path, _ = _sweep(tmp_path, job_path, space=space)
    with pytest.raises(SpecError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        load_sweep_spec(spec_path)
    result = CliRunner().invoke(cli, ["sweep", "validate", "--offline", str(spec_path)])
    assert result.exit_code == 2 and expected in result.output, result.output


def test_more_concurrent_trials_than_can_ever_fit_are_refused(tmp_path: Path) -> None:
    job_path, _ = make_spec(tmp_path)
    spec_path, _ = _sweep(tmp_path, job_path, max_concurrent_trials=3)
    sweep = load_sweep_spec(spec_path)
    two_cpus = [{"CPU": 2.0, "memory": 8 * 2**30}]
    with pytest.raises(SpecError, match="max_concurrent_trials: 3, but the cluster holds at most 1 trial"):
        check_concurrency(sweep, sweep.base_job, two_cpus, "sweep")
    assert check_concurrency(sweep.model_copy(update={"max_concurrent_trials": None}), sweep.base_job,
                             [{"CPU": 6.0}], "sweep") == 3  # as many as fit


def test_a_sweep_the_cluster_cannot_hold_is_refused_before_anything_starts_by_run_and_submit(
    stack: Stack, settings: Settings, tmp_path: Path, digits: ShardManifest,
) -> None:
    job_path, _ = make_spec(tmp_path, **SMALL)
    spec_path, sweep = _sweep(tmp_path, job_path, max_concurrent_trials=2)
    result = subprocess.run([COMPOUND, "sweep", "run", str(spec_path), "--home", str(stack.home)],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "max_concurrent_trials: 2" in result.stderr + result.stdout
    refused = CliRunner().invoke(cli, ["sweep", "submit", str(spec_path), "--dry-run", "--home", str(stack.home)])
    assert refused.exit_code == 2 and "max_concurrent_trials: 2" in refused.output, refused.output
    fine, _ = _sweep(tmp_path, job_path)
    checked = CliRunner().invoke(cli, ["sweep", "submit", str(fine), "--dry-run", "--home", str(stack.home)])
    assert checked.exit_code == 0 and "compound sweep run s3://checkpoints/sweeps/" in checked.output, checked.output
    client = MlflowClient(settings.mlflow_tracking_uri)
    found = client.get_experiment_by_name("smoke")
    assert found is None or not client.search_runs(
        [found.experiment_id], filter_string=f"tags.`compound.sweep` = '{sweep['name']}'"), "a parent run was created"


def test_the_optuna_searcher_samples_the_space_within_its_bounds(tmp_path: Path) -> None:
    from cluster.tune import AshaSpec, SearcherSpec, Sweep, _searcher

    job_path, _ = make_spec(tmp_path)
    spec_path, _ = _sweep(tmp_path, job_path, searcher={"name": "optuna", "seed": 3},
                          space={"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}, "model.dropout": {"uniform": [0.1, 0.5]},
                                 "data.augment.randaugment_magnitude": {"randint": [5, 16]},
                                 "optim.label_smoothing": {"choice": [0.0, 0.1]}})
    spec = load_sweep_spec(spec_path)
    plan = Sweep(name=spec.name, storage_path="unused", filesystem=None, space=spec.space,
                 searcher=SearcherSpec(name="optuna", seed=3), scheduler=AshaSpec(), max_epochs=3, trials=4,
                 metric=spec.metric, mode=spec.mode, max_concurrent_trials=1, max_failures=0)
    searcher = _searcher(plan)
    assert searcher.set_search_properties(spec.metric, spec.mode, {p: d.domain() for p, d in spec.space.items()})
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    for config in configs:
        assert 1e-4 <= config["optim.lr"] <= 1e-2 and 0.1 <= config["model.dropout"] <= 0.5
        assert 5 <= config["data.augment.randaugment_magnitude"] < 16 and config["optim.label_smoothing"] in (0.0, 0.1)
        spec.trial_data(config)  # every sample is a job spec with those values
    assert len({c["optim.lr"] for c in configs}) == 4
