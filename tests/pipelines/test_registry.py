"""The registry against the real MLflow server and S3 store: gated promotion (and what it records), a
promotion the gate rejects, rollback, two promotions at once, and an alias moved by hand."""

from __future__ import annotations

import itertools
import json
import threading
import uuid

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from cluster.storage import S3Access
from compound.cli import cli
from infra.settings import Settings
from infra.stack import Stack
from pipelines.registry import (
    CHALLENGER,
    CHAMPION,
    DECISION_TAG,
    HISTORY_TAG,
    Gate,
    RegistryError,
    alias_version,
    promote,
    promoter_client,
    register_version,
    rollback,
)

GATE = Gate(tolerance=1.0, max_int8_drop=1.0, max_latency_ms=50)


def _version(settings: Settings, name: str, run_id: str, top1: float, change: float = -0.3, latency: float = 5.0,
             majority: float = 0.11, gate: Gate = GATE, pipeline_run: str | None = None) -> int:
    """A version registered as a pipeline run would (each by a pipeline run of its own unless one is given)."""
    return register_version(settings.mlflow_tracking_uri, name=name, run_id=run_id,
                            tags={"compound.pipeline_run": pipeline_run or uuid.uuid4().hex,
                                  "compound.dataset_id": "digits@1"},
                            metrics={"int8_top1": top1, "int8_change_points": change, "int8_latency_ms": latency,
                                     "majority_top1": majority},
                            gate=gate)


def _promote(settings: Settings, s3: S3Access, name: str, version: int, **options):
    return promote(settings, name=name, version=version, **options)


def test_the_gate_decides_and_every_decision_is_recorded(stack: Stack, settings: Settings, s3: S3Access,
                                                         model_run: str) -> None:
    name = f"reg-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(settings.mlflow_tracking_uri)
    v1 = _version(settings, name, model_run, top1=0.90)
    assert alias_version(client, name, CHALLENGER) == v1 and alias_version(client, name, CHAMPION) is None
    first = _promote(settings, s3, name, v1)
    assert first.action == "promoted" and alias_version(client, name, CHAMPION) == v1
    assert any("no champion to compare with" in line for line in first.reasons)
    assert "ok: int8 top-1 90.00% > 11.00%, always answering the most common class" in first.reasons

    worse = _version(settings, name, model_run, top1=0.85)  # 5 points below the champion, tolerance 1
    home = ["--home", str(stack.home)]
    result = CliRunner().invoke(cli, ["registry", "promote", name, "--version", str(worse), *home])
    assert result.exit_code == 3, result.output
    assert "rejected" in result.output and "FAILED: int8 top-1 85.00% ≥ champion v1's 90.00% − 1 points" in result.output
    assert alias_version(client, name, CHAMPION) == v1  # unchanged
    tags = client.get_model_version(name, str(worse)).tags
    assert tags[DECISION_TAG] == "rejected" and "FAILED" in tags["compound.promotion_reasons"]

    slow = _version(settings, name, model_run, top1=0.95, latency=80.0)  # better, but over the latency bound
    assert _promote(settings, s3, name, slow).action == "rejected"
    lossy = _version(settings, name, model_run, top1=0.95, change=-3.0)  # int8 lost too much
    decision = _promote(settings, s3, name, lossy)
    assert decision.action == "rejected" and "FAILED: int8 vs fp32 top-1 −3.00 points ≥ −1 points" in decision.reasons

    result = CliRunner().invoke(cli, ["registry", "promote", name, "--version", str(worse), "--force", *home])
    assert result.exit_code == 2 and "--reason" in result.output  # a forced promotion says why
    result = CliRunner().invoke(cli, ["registry", "promote", name, "--version", str(worse), "--force",
                                      "--reason", "hotfix for class 7", *home])
    assert result.exit_code == 0 and "forced" in result.output
    assert alias_version(client, name, CHAMPION) == worse
    assert "reason: hotfix for class 7" in client.get_model_version(name, str(worse)).tags["compound.promotion_reasons"]

    result = CliRunner().invoke(cli, ["registry", "rollback", name, "--reason", "bad in production", *home])
    assert result.exit_code == 0, result.output
    assert alias_version(client, name, CHAMPION) == v1
    assert client.get_model_version(name, str(worse)).tags[DECISION_TAG] == "rolled back"
    assert client.get_model_version(name, str(v1)).tags[DECISION_TAG] == "restored"
    history = json.loads(client.get_registered_model(name).tags[HISTORY_TAG])
    assert [(h["version"], h["action"]) for h in history] == [(v1, "promoted"), (worse, "forced"), (v1, "rolled back")]
    with pytest.raises(RegistryError, match="no champion before v1"):  # nothing earlier to go back to
        rollback(settings, name=name)

    shown = CliRunner().invoke(cli, ["registry", "show", name, *home])
    assert shown.exit_code == 0 and "champion history: v1 (promoted" in shown.output, shown.output
    shown = json.loads(CliRunner().invoke(cli, ["registry", "show", name, "--json", *home]).output)
    assert [v["aliases"] for v in shown["versions"]] == [[CHAMPION], [], [], [CHALLENGER]]
    assert shown["versions"][0]["tags"]["compound.dataset_id"] == "digits@1" and len(shown["history"]) == 3
    listed = CliRunner().invoke(cli, ["registry", "list", "--json", *home])
    entry = next(m for m in json.loads(listed.output) if m["name"] == name)
    assert entry["aliases"][CHAMPION] == v1 and entry["latest"] == lossy


def test_the_gate_never_crowns_a_model_at_chance_even_with_no_champion(stack: Stack, settings: Settings,
                                                                       s3: S3Access, model_run: str) -> None:
    name = f"floor-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(settings.mlflow_tracking_uri)
    # The demo's old failure: a student at chance on the digits, int8 "better" than fp32 by luck.
    at_chance = _version(settings, name, model_run, top1=0.106, change=+10.9, majority=0.109)
    decision = _promote(settings, s3, name, at_chance)
    assert decision.action == "rejected" and alias_version(client, name, CHAMPION) is None
    assert "FAILED: int8 top-1 10.60% > 10.90%, always answering the most common class" in decision.reasons
    assert "ok: int8 vs fp32 top-1 +10.90 points, a gain ≥ −1 points" in decision.reasons  # a gain reads as one

    floored = Gate(min_top1=90, tolerance=1.0, max_int8_drop=1.0)
    below = _version(settings, name, model_run, top1=0.85, gate=floored)  # beats the majority, not the floor
    decision = _promote(settings, s3, name, below)
    assert decision.action == "rejected" and "FAILED: int8 top-1 85.00% ≥ the floor 90 %" in decision.reasons
    good = _version(settings, name, model_run, top1=0.93, gate=floored)
    assert _promote(settings, s3, name, good).action == "promoted"
    shown = CliRunner().invoke(cli, ["registry", "show", name, "--home", str(stack.home)])
    assert "+10.90" in shown.output and "-0.30" in shown.output  # signed, in the version table


def test_two_promotions_at_once_leave_one_champion_and_a_consistent_history(
        stack: Stack, settings: Settings, s3: S3Access, model_run: str) -> None:
    name = f"race-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(settings.mlflow_tracking_uri)
    v1 = _version(settings, name, model_run, top1=0.90)
    assert _promote(settings, s3, name, v1).promoted
    contenders = [_version(settings, name, model_run, top1=0.915), _version(settings, name, model_run, top1=0.92)]
    start, decisions = threading.Barrier(len(contenders)), {}

    def race(version: int) -> None:
        start.wait()
        decisions[version] = _promote(settings, s3, name, version)

    threads = [threading.Thread(target=race, args=(v,)) for v in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(d.promoted for d in decisions.values())  # both pass the gate against whoever is champion
    history = json.loads(client.get_registered_model(name).tags[HISTORY_TAG])
    # One after the other: each saw the champion the one before it made.
    assert history[0]["version"] == v1 and len(history) == 3
    for before, after in itertools.pairwise(history):
        assert after["previous"] == before["version"]
    champion = alias_version(client, name, CHAMPION)
    assert champion == history[-1]["version"] and champion in contenders
    other = next(v for v in contenders if v != champion)
    assert decisions[champion].previous == other and decisions[other].previous == v1
    assert not s3.client().list_objects_v2(Bucket=settings.checkpoints_bucket,
                                           Prefix="registry-locks/").get("Contents")  # the lock was released


def test_an_alias_moved_by_hand_is_what_the_registry_goes_by(stack: Stack, settings: Settings, s3: S3Access,
                                                             model_run: str) -> None:
    name = f"hand-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(settings.mlflow_tracking_uri)
    v1 = _version(settings, name, model_run, top1=0.80)
    assert _promote(settings, s3, name, v1).promoted
    v2 = _version(settings, name, model_run, top1=0.95)
    promoter_client(settings).set_registered_model_alias(name, CHAMPION, v2)  # as a promoter would in the MLflow UI
    v3 = _version(settings, name, model_run, top1=0.90)  # beats v1, not the champion set by hand
    decision = _promote(settings, s3, name, v3)
    assert decision.action == "rejected" and any("champion v2's 95.00%" in line for line in decision.reasons)
    rolled = rollback(settings, name=name)
    assert rolled.previous == v2 and rolled.champion == v1 == alias_version(client, name, CHAMPION)


def test_only_the_promoter_role_moves_champion(stack: Stack, settings: Settings, s3: S3Access, model_run: str,
                                              tmp_path, monkeypatch) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    name = f"role-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(settings.mlflow_tracking_uri)  # the stack's own login: an admin of the auth app
    v1 = _version(settings, name, model_run, top1=0.90)  # registering and `challenger` are its to do
    with pytest.raises(MlflowException, match="promoter") as refused:
        client.set_registered_model_alias(name, CHAMPION, v1)
    assert refused.value.error_code == "PERMISSION_DENIED"

    # A user with EDIT on the model but not the role: other aliases yes, champion no.
    admin = AuthServiceClient(settings.mlflow_tracking_uri)
    user, password = f"someone-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    admin.create_user(user, password)
    admin.grant_user_permission(user, "registered_model", name, "EDIT")
    promoters = next(r for r in admin.list_all_roles() if r.name == "promoter")
    with monkeypatch.context() as logged_in:
        logged_in.setenv("MLFLOW_TRACKING_USERNAME", user)
        logged_in.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client.set_registered_model_alias(name, "staging", v1)
        with pytest.raises(MlflowException, match="promoter"):
            client.set_registered_model_alias(name, CHAMPION, v1)

    # `compound registry promote` from settings without the promoter's login: refused, nothing recorded.
    keyless = tmp_path / "home"
    keyless.mkdir()
    values = json.loads((stack.home / "settings.json").read_text())
    for field in ("mlflow_promoter_username", "mlflow_promoter_password", "server_url", "server_token"):
        values.pop(field)  # promoting here, not through the server, with the stack's own login
    (keyless / "settings.json").write_text(json.dumps(values))
    monkeypatch.delenv("COMPOUND_MLFLOW_PROMOTER_USERNAME", raising=False)
    result = CliRunner().invoke(cli, ["registry", "promote", name, "--version", str(v1), "--home", str(keyless)])
    assert result.exit_code == 1 and "promoter role" in result.output, result.output
    assert alias_version(client, name, CHAMPION) is None
    assert DECISION_TAG not in client.get_model_version(name, str(v1)).tags

    # The promotion path logs in as the promoter; a user given the role may move champion too.
    assert _promote(settings, s3, name, v1).action == "promoted" and alias_version(client, name, CHAMPION) == v1
    admin.assign_role(user, promoters.id)
    v2 = _version(settings, name, model_run, top1=0.91)
    with monkeypatch.context() as logged_in:
        logged_in.setenv("MLFLOW_TRACKING_USERNAME", user)
        logged_in.setenv("MLFLOW_TRACKING_PASSWORD", password)
        client.set_registered_model_alias(name, CHAMPION, v2)
    assert alias_version(client, name, CHAMPION) == v2


def test_registering_one_run_twice_for_one_pipeline_run_yields_one_version(settings: Settings, model_run: str) -> None:
    name = f"twice-{uuid.uuid4().hex[:6]}"
    client = MlflowClient(settings.mlflow_tracking_uri)
    first = _version(settings, name, model_run, top1=0.90, pipeline_run="p" * 32)
    assert _version(settings, name, model_run, top1=0.90, pipeline_run="p" * 32) == first  # its stage, run again
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    other = register_version(settings.mlflow_tracking_uri, name=name, run_id=model_run, metrics={}, gate=None,
                             tags={"compound.pipeline_run": "q" * 32})  # another pipeline run: a version of its own
    assert other == first + 1 and alias_version(client, name, CHALLENGER) == other


def test_an_unknown_model_or_version_is_a_clear_error(stack: Stack, settings: Settings, s3: S3Access) -> None:
    result = CliRunner().invoke(cli, ["registry", "promote", "no-such-model", "--version", "1",
                                      "--home", str(stack.home)])
    assert result.exit_code == 1 and "no-such-model" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["registry", "rollback", "no-such-model", "--home", str(stack.home)])
    assert result.exit_code == 1 and "no-such-model" in result.output
