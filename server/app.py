"""The server's HTTP API (FastAPI; the schema at /openapi.json): the routes of `server.routes` on the server's
parts. Every route but /health wants a bearer token and names the least role it needs (`server.access`)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from infra.settings import Settings
from server.access import ServerParts
from server.queue import Queue
from server.routes import ROUTERS


def make_app(engine, settings: Callable[[], Settings], queue: Queue, schedules: str) -> FastAPI:
    """The API on the server's database `engine`; `settings`: the stack's (MLflow, S3, the promoter);
    `schedules`: the schedules' store (a SQLAlchemy URL)."""
    app = FastAPI(title="compound server", version="1")
    app.state.parts = ServerParts(engine=engine, settings=settings, queue=queue, schedules=schedules)

    @app.get("/health", include_in_schema=False)
    def health() -> str:
        return "OK"

    for router in ROUTERS:
        app.include_router(router)
    return app
