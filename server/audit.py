"""Who did what, when, and how it ended: every action through the server (and every refusal), one row
each, read with `compound audit`."""

from __future__ import annotations

import datetime

from sqlalchemy import Column, Integer, String, Table, Text, select

from pipelines.scheduler import UtcDateTime
from server.users import metadata

AUDIT = Table(
    "compound_audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False, index=True),
    Column("who", String(63), nullable=False),  # a user's name, or "anonymous"
    Column("action", String(63), nullable=False),  # e.g. registry.promote
    Column("target", String(500)),
    Column("outcome", String(20), nullable=False),  # ok | refused (401) | denied (403) | failed
    Column("detail", Text),
)


def record(engine, *, who: str, action: str, target: str | None, outcome: str, detail: str | None = None) -> None:
    with engine.begin() as connection:
        connection.execute(AUDIT.insert().values(at=datetime.datetime.now(datetime.UTC), who=who, action=action,
                                                 target=target, outcome=outcome, detail=(detail or None) and detail[:4000]))


def entries(engine, *, limit: int = 100) -> list[dict]:
    """The newest first."""
    with engine.connect() as connection:
        rows = connection.execute(select(AUDIT).order_by(AUDIT.c.id.desc()).limit(limit))
        return [dict(row._mapping) for row in rows]
