"""The whole pipeline at tiny size against the real stack: a teacher sweep (of one trial), distillation
into B0, int8 quantization, evaluation, registration and gated promotion — failing at a stage, resumed there
with the finished stages reused, then re-run from a stage as a submitted Ray job."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from cluster.data.manifest import ShardManifest, load_manifest
from cluster.storage import S3Access, split_s3_url
from compound.cli import cli
from infra.settings import Settings
from infra.stack import Stack
from jobs.lease import LEASE_FILE, held
from jobs.tags import PARENT_TAG
from pipelines.registry import CHALLENGER, CHAMPION, alias_version
from pipelines.runner import DATA_TAG, STAGE_RECORD_PREFIX

EXAMPLES = Path(__file__).parents[2] / "pipelines" / "examples"
MODEL = "digits-tiny-b0"
REUSED = ["teacher", "student", "int8"]


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def _json(output: str):
    """The JSON a command printed (its log lines are beside it)."""
    return json.loads(next(line for line in output.splitlines() if line.startswith(("{", "["))))


@pytest.fixture(scope="module")
def late_model(s3: S3Access) -> str:
    """A model the evaluate stage is told to compare, which on the first run is not yet a model: the file is
    there (a pipeline's literal models are checked before it starts), its contents are not."""
    url = f"s3://checkpoints/late-{uuid.uuid4().hex[:8]}/model.onnx"
    s3.client().put_object(Bucket="checkpoints", Key=split_s3_url(url)[1], Body=b"not an ONNX model yet")
    return url


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory: pytest.TempPathFactory, late_model: str) -> Path:
    data = yaml.safe_load((EXAMPLES / "digits-tiny.yaml").read_text())
    data["stages"]["evaluate"]["with"]["models"]["late"] = late_model
    folder = tmp_path_factory.mktemp("pipeline")
    for name in ("b0-tiny-teacher.yaml", "b0-tiny-student.yaml"):
        (folder / name).write_text((EXAMPLES / name).read_text())
    # One trial: the stage's sweep is what is tested here; a sweep of several is in tests/jobs/test_sweep.py.
    sweep = yaml.safe_load((EXAMPLES / "tiny-teacher-sweep.yaml").read_text())
    (folder / "tiny-teacher-sweep.yaml").write_text(yaml.safe_dump({**sweep, "trials": 1}, sort_keys=False))
    path = folder / "digits-tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_tiny_pipeline_resumes_at_its_failed_stage_and_promotes_a_champion(
        stack: Stack, settings: Settings, s3: S3Access, digits: ShardManifest, pipeline_file: Path,
        late_model: str) -> None:
    home = ("--home", str(stack.home))
    code, output = _invoke("pipeline", "run", str(pipeline_file), *home)
    assert code == 1 and "stage evaluate (evaluate) failed" in output and "run the pipeline again" in output, output
    code, output = _invoke("pipeline", "status", "digits-tiny", "--json", *home)
    (failed,) = _json(output)
    assert failed["status"] == "FAILED"
    assert failed["url"].endswith(f"/runs/{failed['run_id']}?workflowType=machine_learning")  # MLflow's training view
    assert [(stage, record["status"]) for stage, record in failed["stages"].items()] == [
        ("teacher", "finished"), ("student", "finished"), ("int8", "finished"), ("evaluate", "failed"),
        ("register", "pending"), ("promote", "pending")]
    assert late_model.split("/")[-2] in failed["stages"]["evaluate"]["error"]
    first = {stage: failed["stages"][stage]["outputs"] for stage in REUSED}

    # The late model lands (the student's int8 copy); the same run resumes at evaluate.
    int8 = first["int8"]["int8_onnx"]
    s3.client().copy_object(CopySource="/".join(split_s3_url(int8)), Bucket=split_s3_url(late_model)[0],
                            Key=split_s3_url(late_model)[1])
    code, output = _invoke("pipeline", "run", str(pipeline_file), "--json", *home)
    assert code == 0, output
    outcome = _json(output)
    assert outcome["mlflow_run_id"] == failed["run_id"] and outcome["resumed"] and outcome["reused"] == REUSED
    outputs = outcome["outputs"]
    assert {stage: outputs[stage] for stage in REUSED} == first  # nothing retrained

    figures = outputs["evaluate"]["figures"]
    assert set(figures) == {"teacher", "student", "student_int8", "late"}
    assert figures["late"]["top1"] == figures["student_int8"]["top1"]  # the same model
    # chance: 0.1; measured here (2026-12-06) teacher 0.954, student 0.956, int8 0.956, agreement 0.954
    assert figures["teacher"]["top1"] > 0.85 and figures["student"]["top1"] > 0.85, figures
    assert 0 <= figures["student"]["agreement"] <= 1 and "agreement" not in figures["teacher"]  # with the first
    int8 = outputs["int8"]  # the quantize stage's figures are the evaluate stage's for the same files
    assert int8["change_points"] == pytest.approx((int8["int8_top1"] - int8["fp32_top1"]) * 100)
    assert int8["int8_top1"] == pytest.approx(figures["student_int8"]["top1"])
    assert outputs["register"]["version"] == 1 and outputs["promote"]["action"] == "promoted"

    client = MlflowClient(settings.mlflow_tracking_uri)
    parent = client.get_run(outcome["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags[DATA_TAG] == "s3://shards/digits/manifest.json"
    # What a person sees in MLflow: the model-training view, the dataset as an input, the figures as metrics.
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (dataset_input,) = parent.inputs.dataset_inputs
    _, digits_id = load_manifest("s3://shards/digits/manifest.json", s3=s3)
    assert dataset_input.dataset.name == "digits" and digits_id.startswith(dataset_input.dataset.digest)
    assert json.loads(dataset_input.dataset.profile)["samples"] == {"train": digits.split("train").samples,
                                                                    "val": digits.split("val").samples}
    metrics = parent.data.metrics
    assert metrics["evaluate/teacher_top1"] == pytest.approx(figures["teacher"]["top1"])
    assert metrics["evaluate/student_agreement"] == pytest.approx(figures["student"]["agreement"])
    assert metrics["int8/change_points"] == pytest.approx(outputs["int8"]["change_points"])
    records = {key.removeprefix(STAGE_RECORD_PREFIX): json.loads(value) for key, value in parent.data.tags.items()
               if key.startswith(STAGE_RECORD_PREFIX)}
    assert all(record["status"] == "finished" for record in records.values()) and len(records) == 6
    children = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    by_stage = {}
    for child in children:
        by_stage.setdefault(child.data.tags["compound.stage"], []).append(child)
    assert sorted(by_stage) == ["evaluate", "int8", "student", "teacher"]
    (sweep_run,) = by_stage["teacher"]
    assert "compound.sweep" in sweep_run.data.tags  # the sweep's parent run, its trials under it
    trials = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{sweep_run.info.run_id}'")
    assert len(trials) == 1
    assert sorted(r.info.status for r in by_stage["evaluate"]) == ["FAILED", "FINISHED"]
    assert by_stage["student"][0].info.run_id == outputs["student"]["run_id"]

    version = client.get_model_version(MODEL, "1")
    tags = version.tags
    assert version.run_id == outputs["student"]["run_id"]
    assert tags["compound.pipeline_run"] == parent.info.run_id
    assert tags["compound.teacher_run"] == outputs["teacher"]["run_id"] and tags["compound.teacher_run"]
    assert tags["compound.dataset_id"] and tags["compound.code_version"]
    assert tags["compound.quantization_recipe"] == outputs["int8"]["recipe"]
    assert float(tags["compound.metric.int8_top1"]) == pytest.approx(outputs["int8"]["int8_top1"], rel=1e-5)  # 6 digits
    assert float(tags["compound.metric.teacher_top1"]) == pytest.approx(figures["teacher"]["top1"], rel=1e-5)
    assert alias_version(client, MODEL, CHAMPION) == 1 == alias_version(client, MODEL, CHALLENGER)
    # The version's page: the summary table, then the gate's decision and its reasons.
    description = client.get_model_version(MODEL, "1").description
    assert f"| teacher | {figures['teacher']['top1']:.1%} |" in description, description
    assert "#### Promotion: promoted" in description and "- ok: no champion to compare with" in description
    deployed = {a.path for a in client.list_artifacts(version.run_id, "deploy")}
    assert {"deploy/model.int8.onnx", "deploy/model.fp32.onnx", "deploy/quantization.json"} <= deployed
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    champion = mlflow.pytorch.load_model(f"models:/{MODEL}@{CHAMPION}")
    with torch.no_grad():
        assert champion(torch.zeros(1, 3, 32, 32)).shape == (1, 10)

    # Submitted as a Ray job, re-run from promote: the earlier stages are reused; v1 stays champion.
    code, output = _invoke("pipeline", "submit", str(pipeline_file), "--from", "promote", "--follow", *home)
    assert code == 0 and "SUCCEEDED" in output, output
    code, output = _invoke("pipeline", "status", "digits-tiny", "--json", *home)
    latest = _json(output)[0]
    assert latest["run_id"] == parent.info.run_id and latest["submission_id"] and latest["status"] == "FINISHED"
    assert latest["stages"]["promote"]["attempt"] == 1 and latest["stages"]["promote"]["outputs"]["action"] == \
        "unchanged"
    assert latest["stages"]["register"]["outputs"]["version"] == 1  # not registered twice


def test_a_pipeline_on_data_that_is_not_there_is_refused_and_records_nothing(
        stack: Stack, settings: Settings, pipeline_file: Path, tmp_path: Path) -> None:
    home = ("--home", str(stack.home))
    nowhere = "s3://shards/nowhere/manifest.json"
    for command in ("run", "submit"):
        code, output = _invoke("pipeline", command, str(pipeline_file), "--data", nowhere, *home)
        assert code == 2 and f"data: no dataset at {nowhere}" in output and "compound data shards" in output, output
    code, output = _invoke("pipeline", "run", str(pipeline_file), "--from", "evaluation", *home)
    assert code == 2 and "no stage 'evaluation'" in output
    runs = _json(_invoke("pipeline", "status", "digits-tiny", "--json", *home)[1])
    assert all(run["data"] != nowhere for run in runs)


def test_a_teacher_that_is_not_there_is_refused_before_any_stage_trains(
        stack: Stack, settings: Settings, digits, pipeline_file: Path) -> None:
    home = ("--home", str(stack.home))
    data = yaml.safe_load(pipeline_file.read_text())
    data["name"] = "digits-tiny-no-teacher"
    data["stages"]["student"]["with"]["teacher"] = "models:/no-such-model@champion"
    data["stages"]["evaluate"]["with"]["models"]["late"] = "s3://checkpoints/no/such/model.onnx"
    path = pipeline_file.with_name("no-teacher.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    for command in ("run", "submit"):
        code, output = _invoke("pipeline", command, str(path), *home)
        assert code == 2, output
        assert "stages.student.with.teacher: models:/no-such-model@champion" in output, output
        assert "stages.evaluate.with.models.late: s3://checkpoints/no/such/model.onnx" in output, output
    assert _json(_invoke("pipeline", "status", "digits-tiny-no-teacher", "--json", *home)[1]) == []


def test_a_second_driver_of_a_running_pipeline_is_refused_and_records_nothing(
        stack: Stack, settings: Settings, s3: S3Access, digits, pipeline_file: Path) -> None:
    home = ("--home", str(stack.home))
    data = yaml.safe_load(pipeline_file.read_text())
    data["name"] = "digits-tiny-driven"
    path = pipeline_file.with_name("driven.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    lease = f"s3://{settings.checkpoints_bucket}/pipelines/digits-tiny-driven/{LEASE_FILE}"
    with held(s3, lease, what="pipeline digits-tiny-driven", holder="submission digits-tiny-driven-1"):  # running
        code, output = _invoke("pipeline", "run", str(path), *home)  # a second driver, by hand
    assert code == 1 and "already being run by submission digits-tiny-driven-1" in output, output
    assert _json(_invoke("pipeline", "status", "digits-tiny-driven", "--json", *home)[1]) == []  # no run opened
