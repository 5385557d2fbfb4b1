"""`python -m server --port N`: the compound server (`compound up` starts it). Its database is
$COMPOUND_SCHEDULER_STORE (a URL that may hold a password: never a command-line argument); its first
admin is $COMPOUND_SERVER_ADMIN with the token $COMPOUND_SERVER_ADMIN_TOKEN."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import threading

log = logging.getLogger("server")
SCHEDULES_TEAM = "schedules"  # the team scheduled runs count against (`compound queue quota schedules …`)
ADMIN_ENV, ADMIN_TOKEN_ENV, STORE_ENV = "COMPOUND_SERVER_ADMIN", "COMPOUND_SERVER_ADMIN_TOKEN", "COMPOUND_SCHEDULER_STORE"


def main() -> None:
    parser = argparse.ArgumentParser(description="the compound server: its API, its users and the schedules")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    url = os.environ.get(STORE_ENV)
    if not url:
        parser.error(f"set {STORE_ENV} to the server's database (a SQLAlchemy URL)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(url, host=args.host, port=args.port)


def serve(url: str, *, host: str, port: int) -> None:
    import uvicorn

    from infra.settings import load_settings
    from pipelines.scheduler import engine_for, run_schedules
    from server.app import make_app
    from server.queue import Queue
    from server.submissions import default_max_runtime
    from server.users import ensure_admin, metadata

    default_max_runtime()  # a wrong value stops the server here, not at the first submission
    engine = engine_for(url)
    metadata.create_all(engine)
    if (admin := os.environ.get(ADMIN_ENV)) and (token := os.environ.get(ADMIN_TOKEN_ENV)):
        ensure_admin(engine, admin, token)
    queue = Queue(engine, load_settings)
    stop = threading.Event()
    enqueue = functools.partial(enqueue_scheduled, queue)
    workers = [threading.Thread(target=run_schedules, args=(url, stop, enqueue), name="schedules", daemon=True),
               threading.Thread(target=enforce_timeouts, args=(engine, stop), name="timeouts", daemon=True),
               threading.Thread(target=admit_queued, args=(queue, stop), name="queue", daemon=True)]
    for worker in workers:
        worker.start()
    try:
        uvicorn.run(make_app(engine, load_settings, queue, url), host=host, port=port, log_level="warning")
    finally:
        stop.set()
        for worker in workers:
            worker.join()


ADMIT_S = 2.0


def enqueue_scheduled(queue, spec, settings, client) -> str:
    """A schedule's firing: its pipeline into the queue like any submission, as the user `scheduler`."""
    import datetime

    from pipelines.submit import plan_pipeline_submission
    from server import audit
    from server.users import User

    scheduler = User(name="scheduler", team=SCHEDULES_TEAM, role="submitter",
                     created=datetime.datetime.now(datetime.UTC), revoked=None)
    entry = queue.enqueue(lambda queued: plan_pipeline_submission(spec, settings, client, queued=queued), scheduler)
    audit.record(queue.engine, who=scheduler.name, action="submission.add", target=entry.submission_id, outcome="ok",
                 detail=f"scheduled run of pipeline {spec.name}")
    queue.nudge()
    return entry.submission_id


def admit_queued(queue, stop: threading.Event) -> None:
    """Every ADMIT_S: start what waits in the queue and now fits (submissions and stops also start a pass)."""
    while not stop.wait(ADMIT_S):
        queue.nudge()


def enforce_timeouts(engine, stop: threading.Event) -> None:
    """Every CHECK_S: stop the submissions past their max_runtime (`jobs.timeouts`), each an audit row."""
    from infra.settings import load_settings
    from jobs.s3 import s3_access
    from jobs.submit import JobsClient
    from jobs.timeouts import CHECK_S, stop_overdue
    from server import audit

    while not stop.wait(CHECK_S):
        try:
            settings = load_settings()
            client = JobsClient(settings.ray_dashboard_url, settings.ray_token)
            for stopped in stop_overdue(client, s3_access(settings), settings.checkpoints_bucket):
                audit.record(engine, who="server", action="job.timeout", target=stopped.submission_id,
                             outcome="ok", detail=f"stopped after its max_runtime of {stopped.max_runtime_s:g} s")
        except Exception:  # the cluster or the store is down: the next look tries again
            log.exception("could not check the submissions' max_runtime")


if __name__ == "__main__":
    main()
