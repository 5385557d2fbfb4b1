"""The model registry on MLflow: versions with their lineage, the `challenger` and `champion` aliases,
gated promotion and rollback (`compound registry …`, and a pipeline's register and promote stages).

MLflow is the source of truth: the champion is whatever the alias points at when a promotion starts,
so an alias moved by hand in the MLflow UI is respected. Each promotion and rollback is recorded as
tags on the versions involved and appended to the registered model's champion history; a lock on S3
(a conditional write: exactly one writer creates the object) makes two promotions at once happen one
after the other, leaving one champion and a history that agrees with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from cluster.storage import S3Access
from infra.settings import Settings
from jobs.lease import LeaseHeld, held
from jobs.s3 import s3_access

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG_PREFIX = "compound.metric."  # a version's figures, e.g. compound.metric.int8_top1
GATE_TAG = "compound.gate"  # a version's: the gate its pipeline asked for (JSON)
DECISION_TAG = "compound.promotion"  # a version's: promoted | rejected | forced | rolled back | restored
REASONS_TAG = "compound.promotion_reasons"
DECISION_HEADING = "#### Promotion:"  # the decision's part of a version's description
# A version's lineage, set by the register stage (`compound model show` prints them).
PIPELINE_RUN_TAG = "compound.pipeline_run"
STUDENT_RUN_TAG = "compound.student_run"
TEACHER_RUN_TAG = "compound.teacher_run"
DATASET_ID_TAG = "compound.dataset_id"
RECIPE_TAG = "compound.quantization_recipe"
INT8_ONNX_TAG, FP32_ONNX_TAG = "compound.int8_onnx", "compound.fp32_onnx"
HISTORY_TAG = "compound.champion_history"  # the registered model's: JSON list of changes, oldest first
HISTORY_KEPT = 40  # within MLflow's 5000 characters a tag value
LOCK_FOLDER = "registry-locks"  # s3://<checkpoints bucket>/registry-locks/<model>.lock
LOCK_WAIT_S = 60.0


class RegistryError(RuntimeError):
    """A registry operation cannot be done; the message says why and what to do."""


class Gate(BaseModel):
    """What a challenger must show to become champion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_top1: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False, description=(
        "int8 top-1 (percent) a version must reach, champion or not; and it must always beat answering the "
        "validation split's most common class"))
    tolerance: float = Field(default=0.5, ge=0, le=100, allow_inf_nan=False,
                             description="top-1 points the challenger may be below the current champion")
    max_int8_drop: float = Field(default=1.0, ge=0, le=100, allow_inf_nan=False,
                                 description="the most top-1 points int8 may lose against fp32")
    max_latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                         description="int8 latency bound, batch 1, median")


@dataclass(frozen=True)
class Decision:
    model: str
    version: int
    action: str  # promoted | forced | rejected | unchanged | rolled back
    champion: int | None  # after the decision
    previous: int | None  # the champion before it
    reasons: list[str] = field(default_factory=list)

    @property
    def promoted(self) -> bool:
        return self.action in ("promoted", "forced", "rolled back")


# --- register ----------------------------------------------------------------------------------------

def register_version(tracking_uri: str, *, name: str, run_id: str, tags: dict[str, str],
                     metrics: dict[str, float], gate: Gate | None, description: str = "") -> int:
    """A new version of `name` from the model logged to `run_id`, with lineage tags and figures, aliased
    `challenger`; `description` (markdown) is what the MLflow UI shows on the version's page, and each
    promotion decision is added below it. Registering one run again for the same pipeline run (a register
    stage run again after its driver died) gives the version made the first time."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        client.create_registered_model(name, description="EfficientNet models registered by compound pipelines")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    all_tags = {**tags, **{f"{METRIC_TAG_PREFIX}{key}": f"{value:.6g}" for key, value in metrics.items()}}
    if gate is not None:
        all_tags[GATE_TAG] = gate.model_dump_json()
    version = _registered_before(client, name, run_id, tags.get(PIPELINE_RUN_TAG))
    if version is None:
        mlflow.set_tracking_uri(tracking_uri)
        version = int(mlflow.register_model(f"runs:/{run_id}/model", name, tags=all_tags).version)
    if description:
        client.update_model_version(name, str(version), description=description)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def _registered_before(client, name: str, run_id: str, pipeline_run: str | None) -> int | None:
    if not pipeline_run:
        return None
    for earlier in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if earlier.tags.get(PIPELINE_RUN_TAG) == pipeline_run:
            log.info("%s v%s: registered by this pipeline run before", name, earlier.version)
            return int(earlier.version)
    return None


# --- promote and roll back ---------------------------------------------------------------------------

def promote(settings: Settings, *, name: str, version: int, gate: Gate | None = None, force: bool = False,
            reason: str | None = None) -> Decision:
    """Make `version` the champion if the gate holds (the version's own gate unless one is given), or
    regardless with `force`; record the decision and its reasons either way. Logged in as the promoter."""
    client = promoter_client(settings)
    _must_be_registered(settings, name)
    with registry_lock(s3_access(settings), settings.checkpoints_bucket, name):
        challenger = _version(client, name, version)
        champion = alias_version(client, name, CHAMPION)
        if champion == version:
            return Decision(name, version, "unchanged", champion, champion, [f"v{version} is already the champion"])
        gate = gate or _recorded_gate(challenger)
        reasons, holds = check_gate(gate, _metrics(challenger),
                                    _metrics(_version(client, name, champion)) if champion else None, champion)
        if not holds and not force:
            _record(client, name, version, "rejected", reasons)
            return Decision(name, version, "rejected", champion, champion, reasons)
        action = "promoted" if holds else "forced"
        if reason:
            reasons = [*reasons, f"reason: {reason}"]
        _crown(client, name, version)
        _record(client, name, version, action, reasons)
        _append_history(client, name, {"version": version, "previous": champion, "action": action, "reason": reason})
        return Decision(name, version, action, version, champion, reasons)


def rollback(settings: Settings, *, name: str, reason: str | None = None) -> Decision:
    """Make the champion before the current one champion again, recorded as a rollback. Logged in as the
    promoter."""
    client = promoter_client(settings)
    _must_be_registered(settings, name)
    with registry_lock(s3_access(settings), settings.checkpoints_bucket, name):
        current = alias_version(client, name, CHAMPION)
        if current is None:
            raise RegistryError(f"model {name} has no champion to roll back")
        line = champion_line(history(client, name), current)
        if len(line) < 2:
            raise RegistryError(f"model {name}: no champion before v{current} is on record; make one champion with "
                                f"`compound registry promote {name} --version V --force --reason …`")
        previous = line[-2]
        _version(client, name, previous)
        reasons = [f"v{current} rolled back to v{previous}"] + ([f"reason: {reason}"] if reason else [])
        _crown(client, name, previous)
        _record(client, name, current, "rolled back", reasons)
        _record(client, name, previous, "restored", reasons)
        _append_history(client, name, {"version": previous, "previous": current, "action": "rolled back",
                                       "reason": reason})
        return Decision(name, previous, "rolled back", previous, current, reasons)


def check_gate(gate: Gate, challenger: dict[str, float], champion: dict[str, float] | None,
               champion_version: int | None) -> tuple[list[str], bool]:
    """Each condition of the gate, as a line saying whether it holds; and whether all do."""
    lines, holds = [], True

    def condition(ok: bool, text: str) -> None:
        nonlocal holds
        holds = holds and ok
        lines.append(f"{'ok' if ok else 'FAILED'}: {text}")

    top1 = challenger.get("int8_top1")
    if top1 is None:
        condition(False, "the version has no int8_top1 figure to judge it by")
        return lines, holds
    # Absolute floors first: they hold whether or not there is a champion to compare with.
    majority = challenger.get("majority_top1")
    condition(majority is not None and top1 > majority,
              f"int8 top-1 {top1:.2%} > {_percent(majority)}, always answering the most common class")
    if gate.min_top1 is not None:
        condition(top1 >= gate.min_top1 / 100, f"int8 top-1 {top1:.2%} ≥ the floor {gate.min_top1:g} %")
    if champion is None or champion.get("int8_top1") is None:
        lines.append("ok: no champion to compare with")
    else:
        floor = champion["int8_top1"] - gate.tolerance / 100
        condition(top1 >= floor, f"int8 top-1 {top1:.2%} ≥ champion v{champion_version}'s "
                                 f"{champion['int8_top1']:.2%} − {gate.tolerance:g} points")
    change = challenger.get("int8_change_points")
    condition(change is not None and change >= -gate.max_int8_drop,
              f"int8 vs fp32 top-1 {signed_points(change)} ≥ −{gate.max_int8_drop:g} points")
    if gate.max_latency_ms is not None:
        latency = challenger.get("int8_latency_ms")
        condition(latency is not None and latency <= gate.max_latency_ms,
                  f"int8 latency {_ms(latency)} ≤ {gate.max_latency_ms:g} ms (batch 1, median)")
    return lines, holds


def _crown(client, name: str, version: int) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, CHAMPION, version)
    except MlflowException as error:
        if error.error_code != "PERMISSION_DENIED":
            raise
        raise RegistryError(
            f"MLflow refused to move {CHAMPION} of {name}: only a login with the promoter role may. Give this "
            "client the promoter's login (mlflow_promoter_username and mlflow_promoter_password in the settings, "
            "or COMPOUND_MLFLOW_PROMOTER_USERNAME/PASSWORD); nothing was changed") from None


def _must_be_registered(settings: Settings, name: str) -> None:
    """Asked with the ordinary login: the promoter may edit every registered model, but MLflow answers it
    "permission denied" for a name that is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(settings.mlflow_tracking_uri).get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"no registered model is named {name}; `compound registry list` shows them") from None
        raise


def promoter_client(settings: Settings):
    """An MLflow client whose registry requests log in as the promoter, whatever login the environment
    gives this process's other clients (MLflow's client reads that at each request, so it cannot be
    swapped for one call without reaching every thread)."""
    from mlflow import MlflowClient
    from mlflow.store.model_registry.rest_store import RestStore
    from mlflow.tracking._model_registry.client import ModelRegistryClient
    from mlflow.utils.credentials import get_default_host_creds

    uri, login = settings.mlflow_tracking_uri, settings.promoter_login()

    def credentials():
        host = get_default_host_creds(uri)  # TLS and other options as the environment sets them
        if login is not None:
            host.username, host.password = login
        return host

    class PromoterRegistry(ModelRegistryClient):
        @property
        def store(self):
            return RestStore(credentials)

    client = MlflowClient(uri)
    client._registry_client_lazy = PromoterRegistry(uri, uri)  # the registry client MLflow would make lazily
    return client


# --- reading -----------------------------------------------------------------------------------------

def alias_version(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def models(client) -> list[dict]:
    """Every registered model: its name, how many versions, the latest, and its aliases."""
    found = []
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{model.name}'")
        found.append({"name": model.name, "versions": len(versions),
                      "latest": max((int(v.version) for v in versions), default=None),
                      "aliases": {alias: int(version) for alias, version in (model.aliases or {}).items()}})
    return found


def model_view(client, name: str) -> dict:
    """A model's versions (aliases, run, tags: figures, lineage, decisions) and its champion history."""
    model = client.get_registered_model(name)
    aliases: dict[int, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(int(version), []).append(alias)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    return {"name": name, "history": history(client, name),
            "versions": [{"version": int(v.version), "aliases": sorted(aliases.get(int(v.version), [])),
                          "run_id": v.run_id, "tags": dict(v.tags)} for v in versions]}


def history(client, name: str) -> list[dict]:
    """Every recorded change of champion, oldest first."""
    tags = client.get_registered_model(name).tags
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def champion_line(changes: list[dict], current: int) -> list[int]:
    """The champions in the order they took over, as promotions push and rollbacks pop them; ending with
    `current` (pushed when it was made champion outside compound, e.g. in the MLflow UI)."""
    line: list[int] = []
    for change in changes:
        if change["action"] == "rolled back":
            if line and line[-1] == change["previous"]:
                line.pop()
            if not line or line[-1] != change["version"]:
                line.append(change["version"])
        else:
            line.append(change["version"])
    if not line or line[-1] != current:
        line.append(current)
    return line


def _version(client, name: str, version: int):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"model {name} has no version {version}; `compound registry show {name}` lists "
                                "its versions") from None
        raise


def _metrics(version) -> dict[str, float]:
    return figures_of(version.tags)


def figures_of(tags: dict[str, str]) -> dict[str, float]:
    """A version's figures from its tags (`compound.metric.int8_top1` → `int8_top1`)."""
    figures = {key.removeprefix(METRIC_TAG_PREFIX): float(value) for key, value in tags.items()
               if key.startswith(METRIC_TAG_PREFIX)}
    if "int8_drop_points" in figures:  # registered before the change was recorded signed
        figures.setdefault("int8_change_points", -figures["int8_drop_points"])
    return figures


def _recorded_gate(version) -> Gate:
    recorded = version.tags.get(GATE_TAG)
    return Gate.model_validate_json(recorded) if recorded else Gate()


def _record(client, name: str, version: int, action: str, reasons: list[str]) -> None:
    at = _now()
    client.set_model_version_tag(name, str(version), DECISION_TAG, action)
    client.set_model_version_tag(name, str(version), REASONS_TAG, "\n".join(reasons)[:5000])
    client.set_model_version_tag(name, str(version), f"{DECISION_TAG}_at", at)
    # The version's page in the UI: what it was registered with, then the latest decision and its reasons.
    registered = (client.get_model_version(name, str(version)).description or "").split(DECISION_HEADING)[0].rstrip()
    decision = f"{DECISION_HEADING} {action} ({at})\n\n" + "\n".join(f"- {reason}" for reason in reasons)
    client.update_model_version(name, str(version), description=f"{registered}\n\n{decision}".strip())


def _append_history(client, name: str, change: dict) -> None:
    changes = [*history(client, name), {**change, "at": _now()}][-HISTORY_KEPT:]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(changes, separators=(",", ":")))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def signed_points(value: float | None) -> str:
    """int8's top-1 against fp32's, in points: a gain reads as one (+0.30 points, a gain), a loss as −0.30."""
    if value is None:
        return "unknown"
    return f"{value:+.2f} points{', a gain' if value > 0 else ''}".replace("-", "−")


def _percent(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2%}"


def _ms(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f} ms"


@contextlib.contextmanager
def registry_lock(s3: S3Access, bucket: str, name: str) -> Iterator[None]:
    """Hold the model's promotion lock, a lease (`jobs.lease`) at s3://<bucket>/registry-locks/<model>.lock,
    waiting up to LOCK_WAIT_S for a promotion that holds it."""
    try:
        with held(s3, f"s3://{bucket}/{LOCK_FOLDER}/{name}.lock", what=f"a promotion of model {name}",
                  holder="a promotion", wait_s=LOCK_WAIT_S):
            yield
    except LeaseHeld as error:  # only entering raises it
        raise RegistryError(str(error)) from None
