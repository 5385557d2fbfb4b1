"""The model registry: its models and versions (anyone), promotions through the gate and rollbacks (promoters)."""

from collections.abc import Callable

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from server.access import Context, Promoter, ServerParts, Viewer, audited
from server.users import User

router = APIRouter()


class Promotion(BaseModel):
    version: int = Field(ge=1)
    force: bool = False
    reason: str | None = Field(default=None, max_length=1000)


class Rollback(BaseModel):
    reason: str | None = Field(default=None, max_length=1000)


class Decision(BaseModel):
    model: str
    version: int
    action: str
    champion: int | None
    previous: int | None
    reasons: list[str]


def _read(parts: ServerParts, read: Callable):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return read(MlflowClient(parts.settings().mlflow_tracking_uri))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise HTTPException(404, f"{str(error).splitlines()[0]}; `compound registry list` shows the "
                                     "registered models") from None
        raise HTTPException(502, f"the MLflow server failed: {str(error).splitlines()[0][:300]}") from None


def _decided(operation: Callable) -> Decision:
    from pipelines.registry import RegistryError

    try:
        decision = operation()
    except RegistryError as error:
        raise HTTPException(409, str(error)) from None
    return Decision(model=decision.model, version=decision.version, action=decision.action,
                    champion=decision.champion, previous=decision.previous, reasons=decision.reasons)


def _signed(reason: str | None, user: User) -> str:
    """The reason recorded with a decision names who asked."""
    return f"{reason} (by {user.name})" if reason else f"by {user.name}"


@router.get("/api/registry", name="registry.list")
def list_models(_: Viewer, parts: Context) -> list[dict]:
    """Every registered model, its latest version and its aliases."""
    from pipelines.registry import models

    return _read(parts, models)


@router.get("/api/registry/{model}", name="registry.show")
def show_model(model: str, _: Viewer, parts: Context) -> dict:
    """A model's versions (aliases, figures, lineage, decisions) and its champion history."""
    from pipelines.registry import model_view

    return _read(parts, lambda client: model_view(client, model))


@router.post("/api/registry/{model}/promote", name="registry.promote", response_model=Decision)
def promote(model: str, asked: Promotion, user: Promoter, parts: Context) -> Decision:
    from pipelines.registry import promote as promote_version

    if asked.force and not asked.reason:
        raise HTTPException(422, "a forced promotion needs a reason: it is recorded with the decision")
    return audited(parts, user, "registry.promote", f"{model} v{asked.version}", lambda: _decided(
        lambda: promote_version(parts.settings(), name=model, version=asked.version, force=asked.force,
                                reason=_signed(asked.reason, user))))


@router.post("/api/registry/{model}/rollback", name="registry.rollback", response_model=Decision)
def rollback(model: str, asked: Rollback, user: Promoter, parts: Context) -> Decision:
    from pipelines.registry import rollback as rollback_model

    return audited(parts, user, "registry.rollback", model, lambda: _decided(
        lambda: rollback_model(parts.settings(), name=model, reason=_signed(asked.reason, user))))
