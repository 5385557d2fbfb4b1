"""The server's HTTP API (FastAPI; the schema at /openapi.json). Every route but /health wants a bearer
token; each names the least role it needs. Refusals (401, 403) and every change are audited.
(No `from __future__ import annotations`: FastAPI reads the routes' annotations, local aliases included.)"""

import datetime
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from infra.settings import Settings
from server import audit, users
from server.users import NAME_PATTERN, ROLES, User


class NewUser(BaseModel):
    name: str = Field(pattern=NAME_PATTERN, description="lower-case letters, digits, - and _")
    team: str = Field(pattern=NAME_PATTERN)
    role: str = Field(pattern="^(" + "|".join(ROLES) + ")$", description=" < ".join(ROLES))


class UserOut(BaseModel):
    name: str
    team: str
    role: str
    created: datetime.datetime
    revoked: datetime.datetime | None


class Credentials(BaseModel):
    """Shown once: the server keeps only the token's hash, MLflow only the password's."""

    name: str
    team: str
    role: str
    token: str
    mlflow_password: str


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


def make_app(engine, settings: Callable[[], Settings]) -> FastAPI:
    """The API on the server's database `engine`; `settings`: the stack's (MLflow, S3, the promoter)."""
    app = FastAPI(title="compound server", version="1")
    bearer = HTTPBearer(auto_error=False)

    def caller(least: str):
        def check(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> User:
            action, target = request.scope["route"].name, request.url.path
            user = users.authenticate(engine, credentials.credentials) if credentials else None
            if user is None:
                audit.record(engine, who="anonymous", action=action, target=target, outcome="refused",
                             detail="no token" if credentials is None else "unknown or revoked token")
                raise HTTPException(401, "a valid bearer token is needed (`compound user add` makes one; the CLI "
                                         "sends the settings' server_token)", headers={"WWW-Authenticate": "Bearer"})
            if not user.may(least):
                audit.record(engine, who=user.name, action=action, target=target, outcome="denied",
                             detail=f"role {user.role}; needs {least}")
                raise HTTPException(403, f"{user.name} is a {user.role}: {action} needs the {least} role or above")
            return user
        return check

    # A route's caller, with the least role it needs.
    Viewer = Annotated[User, Depends(caller("viewer"))]
    Promoter = Annotated[User, Depends(caller("promoter"))]
    Admin = Annotated[User, Depends(caller("admin"))]

    def done(user: User, action: str, target: str, work: Callable[[], object]):
        """Run a change and audit it, however it ends."""
        try:
            result = work()
        except Exception as error:
            detail = error.detail if isinstance(error, HTTPException) else str(error)
            audit.record(engine, who=user.name, action=action, target=target, outcome="failed", detail=detail)
            raise
        audit.record(engine, who=user.name, action=action, target=target, outcome="ok")
        return result

    @app.get("/health", include_in_schema=False)
    def health() -> str:
        return "OK"

    @app.get("/api/whoami", name="whoami", response_model=UserOut)
    def whoami(user: Viewer) -> User:
        return user

    @app.get("/api/users", name="user.list", response_model=list[UserOut])
    def list_users(_: Admin) -> list[User]:
        return users.list_users(engine)

    @app.post("/api/users", name="user.add", response_model=Credentials, status_code=201)
    def add_user(new: NewUser, user: Admin) -> Credentials:
        import requests
        from mlflow.exceptions import MlflowException

        from server.mlflow_logins import add_login

        def add() -> Credentials:
            try:
                token = users.add_user(engine, new.name, team=new.team, role=new.role)
            except users.UserError as error:
                raise HTTPException(409, str(error)) from None
            try:
                password = add_login(settings().mlflow_tracking_uri, new.name, new.role)
            except (MlflowException, requests.RequestException) as error:  # no half-made user
                users.remove(engine, new.name)
                raise HTTPException(502, f"MLflow refused {new.name}'s login: {error}") from None
            return Credentials(name=new.name, team=new.team, role=new.role, token=token, mlflow_password=password)
        return done(user, "user.add", new.name, add)

    @app.post("/api/users/{name}/revoke", name="user.revoke", response_model=UserOut)
    def revoke_user(name: str, user: Admin) -> User:
        from server.mlflow_logins import remove_login

        def revoke() -> User:
            try:
                users.revoke(engine, name)
            except users.UserError as error:
                raise HTTPException(404, str(error)) from None
            remove_login(settings().mlflow_tracking_uri, name)
            return users.find(engine, name)
        return done(user, "user.revoke", name, revoke)

    @app.get("/api/audit", name="audit.list")
    def audit_log(_: Admin, limit: int = 100) -> list[dict]:
        return audit.entries(engine, limit=max(1, min(limit, 10_000)))

    @app.post("/api/registry/{model}/promote", name="registry.promote", response_model=Decision)
    def promote(model: str, asked: Promotion, user: Promoter) -> Decision:
        from pipelines.registry import promote as promote_version

        if asked.force and not asked.reason:
            raise HTTPException(422, "a forced promotion needs a reason: it is recorded with the decision")
        return done(user, "registry.promote", f"{model} v{asked.version}", lambda: _decision(_registry(
            lambda: promote_version(settings(), name=model, version=asked.version, force=asked.force,
                                    reason=_signed(asked.reason, user)))))

    @app.post("/api/registry/{model}/rollback", name="registry.rollback", response_model=Decision)
    def rollback(model: str, asked: Rollback, user: Promoter) -> Decision:
        from pipelines.registry import rollback as rollback_model

        return done(user, "registry.rollback", model, lambda: _decision(_registry(
            lambda: rollback_model(settings(), name=model, reason=_signed(asked.reason, user)))))

    return app


def _registry(operation):
    from pipelines.registry import RegistryError

    try:
        return operation()
    except RegistryError as error:
        raise HTTPException(409, str(error)) from None


def _signed(reason: str | None, user: User) -> str:
    """The reason recorded with a decision names who asked."""
    return f"{reason} (by {user.name})" if reason else f"by {user.name}"


def _decision(decision) -> Decision:
    return Decision(model=decision.model, version=decision.version, action=decision.action,
                    champion=decision.champion, previous=decision.previous, reasons=decision.reasons)
