"""The server's moments (users, the audit log, the schedules' firings) come back from its database in UTC with
their zone, as the API shows them: SQLite keeps none, and a time without one is read in the reader's own zone."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import StatementError

from pipelines.scheduler import engine_for, history, make_scheduler
from pipelines.scheduler import record as record_firing
from server import audit, users
from server.app import make_app


def test_every_stored_moment_is_utc_with_its_zone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/server.db"
    engine = engine_for(url)
    users.metadata.create_all(engine)
    make_scheduler(url)  # makes the firings' table, as the server does
    users.add_user(engine, "ada", team="vision", role="admin")
    users.revoke(engine, "ada")
    audit.record(engine, who="ada", action="user.revoke", target="ada", outcome="ok")
    record_firing(url, "nightly", "submitted", submission_id="nightly-1")

    ada = users.find(engine, "ada")
    (entry,), (firing,) = audit.entries(engine), history(url)
    for moment in (ada.created, ada.revoked, entry["at"], firing["at"]):
        assert moment.tzinfo is not None and moment.utcoffset() == datetime.timedelta(0), moment
        assert abs(datetime.datetime.now(datetime.UTC) - moment) < datetime.timedelta(minutes=1)
    naive = users.USERS.insert().values(name="bob", team="t", role="viewer", token_sha256="0" * 64,
                                        created=datetime.datetime(2026, 1, 1))
    with pytest.raises(StatementError, match="naive time"), engine.begin() as connection:
        connection.execute(naive)  # a time without its zone is refused, not guessed

    users.add_user(engine, "root", team="ops", role="admin", token=(admin := "t" * 43))
    shown = TestClient(make_app(engine, None, None, url)).get(
        "/api/audit", headers={"Authorization": f"Bearer {admin}"}).json()
    assert shown[0]["at"].endswith(("+00:00", "Z")), shown
