"""The server's users: a bearer token each (kept as its SHA-256: a token is 256 random bits, so a slow
hash would add nothing), a team and a role. Roles are ordered, each allowed what the ones below are."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass

from sqlalchemy import Column, MetaData, String, Table, delete, select, update

from infra.settings import new_server_token
from pipelines.scheduler import UtcDateTime

ROLES = ("viewer", "submitter", "promoter", "admin")  # each may do what those before it may
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"

metadata = MetaData()
USERS = Table(
    "compound_users", metadata,
    Column("name", String(63), primary_key=True),
    Column("team", String(63), nullable=False),
    Column("role", String(20), nullable=False),
    Column("token_sha256", String(64), nullable=False, unique=True, index=True),
    Column("created", UtcDateTime, nullable=False),
    Column("revoked", UtcDateTime),
)


class UserError(ValueError):
    """A user cannot be added or changed; the message says why."""


@dataclass(frozen=True)
class User:
    name: str
    team: str
    role: str
    created: datetime.datetime
    revoked: datetime.datetime | None

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_user(engine, name: str, *, team: str, role: str, token: str | None = None) -> str:
    """Add a user; their token (made here unless given), which is shown once and kept only hashed."""
    if role not in ROLES:
        raise UserError(f"role {role!r} is none of {', '.join(ROLES)}")
    found = find(engine, name)
    if found is not None and found.revoked is None:
        raise UserError(f"a user named {name} exists; revoke them first, or choose another name")
    token = token or new_server_token()
    with engine.begin() as connection:
        connection.execute(delete(USERS).where(USERS.c.name == name))  # a revoked user of that name, if any
        connection.execute(USERS.insert().values(name=name, team=team, role=role, token_sha256=digest(token),
                                                 created=_now(), revoked=None))
    return token


def ensure_admin(engine, name: str, token: str) -> None:
    """The stack owner's account, from the server's environment: made if missing, its token and role
    brought in line with the settings if not (a new state dir's token replaces an old one)."""
    found = find(engine, name)
    if found is None:
        add_user(engine, name, team="admins", role="admin", token=token)
        return
    with engine.begin() as connection:
        connection.execute(update(USERS).where(USERS.c.name == name).values(
            token_sha256=digest(token), role="admin", revoked=None))


def remove(engine, name: str) -> None:
    """Forget a user entirely (a user whose MLflow login could not be made)."""
    with engine.begin() as connection:
        connection.execute(delete(USERS).where(USERS.c.name == name))


def revoke(engine, name: str) -> None:
    with engine.begin() as connection:
        done = connection.execute(update(USERS).where(USERS.c.name == name, USERS.c.revoked.is_(None))
                                  .values(revoked=_now()))
    if done.rowcount == 0:
        raise UserError(f"no active user named {name}; `compound user list` shows them")


def authenticate(engine, token: str) -> User | None:
    """The active user whose token this is; None for an unknown or revoked one."""
    with engine.connect() as connection:
        row = connection.execute(select(USERS).where(USERS.c.token_sha256 == digest(token))).first()
    user = _user(row) if row else None
    return user if user is not None and user.revoked is None else None


def find(engine, name: str) -> User | None:
    with engine.connect() as connection:
        row = connection.execute(select(USERS).where(USERS.c.name == name)).first()
    return _user(row) if row else None


def list_users(engine) -> list[User]:
    with engine.connect() as connection:
        return [_user(row) for row in connection.execute(select(USERS).order_by(USERS.c.name))]


def _user(row) -> User:
    return User(name=row.name, team=row.team, role=row.role, created=row.created, revoked=row.revoked)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
