"""Users, their tokens and MLflow logins, and the audit log (admins), and who the caller is (anyone)."""

import datetime

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from server import audit, users
from server.access import Admin, Context, Viewer, audited
from server.users import NAME_PATTERN, ROLES, User

router = APIRouter()


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


@router.get("/api/whoami", name="whoami", response_model=UserOut)
def whoami(user: Viewer) -> User:
    return user


@router.get("/api/users", name="user.list", response_model=list[UserOut])
def list_users(_: Admin, parts: Context) -> list[User]:
    return users.list_users(parts.engine)


@router.post("/api/users", name="user.add", response_model=Credentials, status_code=201)
def add_user(new: NewUser, user: Admin, parts: Context) -> Credentials:
    import requests
    from mlflow.exceptions import MlflowException

    from server.mlflow_logins import add_login

    def add() -> Credentials:
        try:
            token = users.add_user(parts.engine, new.name, team=new.team, role=new.role)
        except users.UserError as error:
            raise HTTPException(409, str(error)) from None
        try:
            password = add_login(parts.settings().mlflow_tracking_uri, new.name, new.role)
        except (MlflowException, requests.RequestException) as error:  # no half-made user
            users.remove(parts.engine, new.name)
            raise HTTPException(502, f"MLflow refused {new.name}'s login: {error}") from None
        return Credentials(name=new.name, team=new.team, role=new.role, token=token, mlflow_password=password)
    return audited(parts, user, "user.add", new.name, add)


@router.post("/api/users/{name}/revoke", name="user.revoke", response_model=UserOut)
def revoke_user(name: str, user: Admin, parts: Context) -> User:
    from server.mlflow_logins import remove_login

    def revoke() -> User:
        try:
            users.revoke(parts.engine, name)
        except users.UserError as error:
            raise HTTPException(404, str(error)) from None
        remove_login(parts.settings().mlflow_tracking_uri, name)
        return users.find(parts.engine, name)
    return audited(parts, user, "user.revoke", name, revoke)


@router.get("/api/audit", name="audit.list")
def audit_log(_: Admin, parts: Context, limit: int = 100) -> list[dict]:
    return audit.entries(parts.engine, limit=max(1, min(limit, 10_000)))
