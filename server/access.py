"""Who calls, and what came of it: the bearer token every route but /health asks for, the least role each
needs, and every refusal (401, 403) and change written to the audit log. Routes reach the server's parts
(database, settings, queue, schedules) through `Context`.
(No `from __future__ import annotations`: FastAPI reads the dependencies' annotations.)"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from infra.settings import Settings
from server import audit, users
from server.queue import Queue
from server.users import User


@dataclass(frozen=True)
class ServerParts:
    engine: object  # the server's database (SQLAlchemy)
    settings: Callable[[], Settings]  # the stack's, read afresh: MLflow, S3, the promoter
    queue: Queue
    schedules: str  # the schedules' store (a SQLAlchemy URL)


def _parts(request: Request) -> ServerParts:
    return request.app.state.parts


Context = Annotated[ServerParts, Depends(_parts)]
_bearer = HTTPBearer(auto_error=False)


def _caller(least: str):
    def check(request: Request, parts: Context,
              credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
        action, target = request.scope["route"].name, request.url.path
        user = users.authenticate(parts.engine, credentials.credentials) if credentials else None
        if user is None:
            audit.record(parts.engine, who="anonymous", action=action, target=target, outcome="refused",
                         detail="no token" if credentials is None else "unknown or revoked token")
            raise HTTPException(401, "a valid bearer token is needed (`compound user add` makes one; the CLI "
                                     "sends the settings' server_token)", headers={"WWW-Authenticate": "Bearer"})
        if not user.may(least):
            audit.record(parts.engine, who=user.name, action=action, target=target, outcome="denied",
                         detail=f"role {user.role}; needs {least}")
            raise HTTPException(403, f"{user.name} is a {user.role}: {action} needs the {least} role or above")
        return user
    return check


# A route's caller, with the least role it needs.
Viewer = Annotated[User, Depends(_caller("viewer"))]
Submitter = Annotated[User, Depends(_caller("submitter"))]
Promoter = Annotated[User, Depends(_caller("promoter"))]
Admin = Annotated[User, Depends(_caller("admin"))]


def audited(parts: ServerParts, user: User, action: str, target: str, work: Callable[[], object], *,
            target_of: Callable[[object], str] | None = None):
    """Run a change and audit it, however it ends; `target_of`: what it made, named from its result."""
    try:
        result = work()
    except Exception as error:
        detail = error.detail if isinstance(error, HTTPException) else str(error)
        denied = isinstance(error, HTTPException) and error.status_code == 403
        audit.record(parts.engine, who=user.name, action=action, target=target,
                     outcome="denied" if denied else "failed", detail=detail)
        raise
    audit.record(parts.engine, who=user.name, action=action, target=target_of(result) if target_of else target,
                 outcome="ok")
    return result
