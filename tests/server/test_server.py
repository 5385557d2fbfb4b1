"""The compound server of the real local stack (`compound up` starts it): tokens and roles, the audit
log, users with MLflow logins that match their role, and promotion through the server."""

from __future__ import annotations

import json
import uuid

import pytest
import requests
from click.testing import CliRunner
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from compound.cli import cli
from infra.settings import Settings
from infra.stack import Stack
from pipelines.registry import CHAMPION, alias_version, register_version


def _invoke(stack: Stack, *args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, [*args, "--home", str(stack.home)], env=env)


def _version(settings: Settings, name: str, run_id: str, top1: float) -> int:
    return register_version(settings.mlflow_tracking_uri, name=name, run_id=run_id, tags={},
                            metrics={"int8_top1": top1, "int8_change_points": -0.1, "majority_top1": 0.11}, gate=None)


def _added(stack: Stack, role: str) -> dict:
    result = _invoke(stack, "user", "add", f"{role}-{uuid.uuid4().hex[:6]}", "--team", "vision", "--role", role,
                     "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _audit(stack: Stack) -> list[dict]:
    result = _invoke(stack, "audit", "--json", "--limit", "500")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_no_token_is_refused_and_health_is_open(settings: Settings, stack: Stack) -> None:
    assert requests.get(f"{settings.server_url}/health", timeout=10).status_code == 200
    anonymous = requests.post(f"{settings.server_url}/api/registry/any/promote", json={"version": 1}, timeout=10)
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"
    forged = requests.get(f"{settings.server_url}/api/whoami", headers={"Authorization": "Bearer cpd_forged"},
                          timeout=10)
    assert forged.status_code == 401
    refusals = [e for e in _audit(stack) if e["who"] == "anonymous" and e["outcome"] == "refused"]
    assert {"registry.promote", "whoami"} <= {e["action"] for e in refusals}
    assert requests.get(f"{settings.server_url}/openapi.json", timeout=10).json()["info"]["title"] == "compound server"


def test_roles_decide_who_promotes_here_and_in_the_mlflow_ui_and_every_action_is_audited(
        settings: Settings, stack: Stack, model_run: str) -> None:
    name = f"served-{uuid.uuid4().hex[:6]}"
    v1 = _version(settings, name, model_run, top1=0.9)
    viewer, promoter = _added(stack, "viewer"), _added(stack, "promoter")

    # A viewer may look, not promote: 403 through the server, and refused by MLflow in the UI's place too.
    as_viewer = {"COMPOUND_SERVER_TOKEN": viewer["token"]}
    assert json.loads(_invoke(stack, "user", "whoami", "--json", env=as_viewer).output)["role"] == "viewer"
    denied = _invoke(stack, "registry", "promote", name, "--version", str(v1), env=as_viewer)
    assert denied.exit_code == 1 and "403" in denied.output and "promoter role" in denied.output, denied.output
    viewer_mlflow = MlflowClient(settings.mlflow_tracking_uri)
    with pytest.MonkeyPatch.context() as login:
        login.setenv("MLFLOW_TRACKING_USERNAME", viewer["name"])
        login.setenv("MLFLOW_TRACKING_PASSWORD", viewer["mlflow_password"])
        assert viewer_mlflow.get_registered_model(name).name == name  # may read
        with pytest.raises(MlflowException):
            viewer_mlflow.set_registered_model_alias(name, CHAMPION, v1)
    assert alias_version(MlflowClient(settings.mlflow_tracking_uri), name, CHAMPION) is None

    # A promoter promotes through the server; the decision names who asked.
    as_promoter = {"COMPOUND_SERVER_TOKEN": promoter["token"]}
    promoted = _invoke(stack, "registry", "promote", name, "--version", str(v1), env=as_promoter)
    assert promoted.exit_code == 0 and "promoted" in promoted.output, promoted.output
    assert alias_version(MlflowClient(settings.mlflow_tracking_uri), name, CHAMPION) == v1
    assert f"by {promoter['name']}" in MlflowClient(settings.mlflow_tracking_uri).get_model_version(
        name, str(v1)).tags["compound.promotion_reasons"]

    # Only an admin manages users or reads the audit log; a revoked token opens nothing.
    assert "403" in _invoke(stack, "user", "add", "sneaky", "--team", "x", "--role", "admin", env=as_promoter).output
    assert _invoke(stack, "user", "revoke", viewer["name"]).exit_code == 0
    assert "401" in _invoke(stack, "registry", "promote", name, "--version", str(v1), env=as_viewer).output
    with pytest.MonkeyPatch.context() as login:  # its MLflow login went with it
        login.setenv("MLFLOW_TRACKING_USERNAME", viewer["name"])
        login.setenv("MLFLOW_TRACKING_PASSWORD", viewer["mlflow_password"])
        with pytest.raises(MlflowException):
            viewer_mlflow.get_registered_model(name)

    log = _audit(stack)
    mine = {(e["who"], e["action"], e["outcome"]) for e in log}
    assert (viewer["name"], "registry.promote", "denied") in mine
    assert (promoter["name"], "registry.promote", "ok") in mine
    assert (promoter["name"], "user.add", "denied") in mine
    owner = next(e["who"] for e in log if e["action"] == "user.add" and e["outcome"] == "ok")
    assert (owner, "user.revoke", "ok") in mine
    listed = json.loads(_invoke(stack, "user", "list", "--json").output)
    assert next(u for u in listed if u["name"] == viewer["name"])["revoked"] is not None


def test_a_user_whose_mlflow_login_cannot_be_made_is_not_made_at_all(settings: Settings, stack: Stack) -> None:
    taken = _invoke(stack, "user", "add", settings.mlflow_username, "--team", "x", "--role", "viewer")
    assert taken.exit_code == 1 and "502" in taken.output, taken.output  # MLflow has a user of that name
    assert settings.mlflow_username not in {u["name"] for u in json.loads(_invoke(stack, "user", "list", "--json").output)}
    assert MlflowClient(settings.mlflow_tracking_uri).search_experiments()  # the stack's own login untouched
    again = _added(stack, "viewer")  # a revoked name may be given again
    assert _invoke(stack, "user", "revoke", again["name"]).exit_code == 0
    result = _invoke(stack, "user", "add", again["name"], "--team", "vision", "--role", "viewer", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["token"] != again["token"], result.output


def test_a_job_past_its_max_runtime_is_stopped_marked_timed_out_and_audited_and_keeps_its_checkpoints(
        settings: Settings, stack: Stack, digits, tmp_path, s3) -> None:
    from tests.jobs.helpers import latest_uploaded, make_spec, submit, wait_for

    # Eight epochs take minutes here; the first checkpoint (10 steps in) comes well within the 100 s, even
    # with the workers starting on two busy cores.
    spec_path, spec = make_spec(tmp_path, max_runtime="100s", model={"resolution": 32}, optim={"epochs": 8},
                                checkpoint={"every_steps": 10})
    job = submit(spec_path, stack, settings)
    wait_for(lambda: latest_uploaded(s3, spec) >= (0, 0), "a first checkpoint", job, timeout_s=100)
    assert job.wait(timeout_s=150) == "STOPPED"  # as Ray has it
    shown = json.loads(_invoke(stack, "job", "status", job.id, "--json").output)
    assert shown["status"] == "TIMED_OUT" and "max_runtime of 100 s" in shown["message"], shown
    listed = json.loads(_invoke(stack, "job", "list", "--json").output)
    assert next(s for s in listed if s["submission_id"] == job.id)["status"] == "TIMED_OUT"
    assert ("server", "job.timeout", job.id, "ok") in {(e["who"], e["action"], e["target"], e["outcome"])
                                                      for e in _audit(stack)}
    assert latest_uploaded(s3, spec) >= (0, 0)  # kept: submitted again, the job resumes from it
