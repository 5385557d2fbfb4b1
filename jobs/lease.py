"""One holder at a time: a lease on S3 for the driver of a job, sweep or pipeline (held for the driver's
whole life), and for a registered model's promotions.

A lease is an object created only where none is (S3 `If-None-Match: *`), renewed by its holder every
RENEW_S, and removed by its holder alone (`If-Match` on its own ETag). Whoever finds one held asks if
its holder still lives: a process on this host that is gone (or whose pid now names another process)
is dead at once, so a killed driver submitted again resumes without waiting; any other holder is dead
once it has not renewed for TTL_S. A dead holder's lease is replaced conditionally on the ETag read,
so of two takers one wins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from cluster.storage import S3Access, is_not_found, lost_a_race, split_s3_url

log = logging.getLogger(__name__)

TTL_S = 90.0
RENEW_S = 15.0
LEASE_FILE = "driver.lease"


def driver(submission_id: str | None, command: str) -> str:
    """How a driver names itself in its lease: its Ray submission, or the command run by hand."""
    return f"submission {submission_id}" if submission_id else f"`{command}` run by hand"


class LeaseHeld(RuntimeError):
    """Another live holder has the lease; the message says who and what to do."""


@dataclass
class Lease:
    """A held lease. `lost` is set if another holder took it over (this one stopped renewing for TTL_S)."""

    url: str
    etag: str  # of its latest write: what renewing and releasing are conditional on
    lost: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def held(s3: S3Access, url: str, *, what: str, holder: str, wait_s: float = 0.0) -> Iterator[Lease]:
    """Hold the lease at `url` (s3://bucket/key) while the block runs. `what` and `holder` are words for
    messages (e.g. "pipeline demo", "submission demo-3"). Held by a live holder: `LeaseHeld`, after
    waiting up to `wait_s` for it to be free."""
    from botocore.exceptions import ClientError

    client, (bucket, key) = s3.client(), split_s3_url(url)
    me = {"token": secrets.token_hex(8), "holder": holder, "host": socket.gethostname(), "pid": os.getpid(),
          "started": _started(os.getpid())}
    deadline = time.monotonic() + wait_s
    while True:
        found = _read(client, bucket, key)
        try:
            if found is None:
                etag = _write(client, bucket, key, me, IfNoneMatch="*")
                break
            body, found_etag = found
            if not _alive(body):
                log.warning("%s: taking over the lease of %s, which is no longer alive", what, body.get("holder", "?"))
                etag = _write(client, bucket, key, me, IfMatch=found_etag)
                break
        except ClientError as error:
            if not lost_a_race(error):
                raise
            continue  # another taker was first: look again
        if time.monotonic() >= deadline:
            age = time.time() - float(body.get("renewed", 0))
            raise LeaseHeld(f"{what} is already being run by {body.get('holder', '?')} on {body.get('host', '?')} "
                            f"(pid {body.get('pid', '?')}; its lease {url} renewed {age:.0f} s ago): wait for it "
                            f"to end or stop it; a holder that stops renewing is taken over after {TTL_S:.0f} s")
        time.sleep(0.2)

    lease, stop = Lease(url, etag), threading.Event()
    renewing = threading.Thread(target=_renew, args=(client, bucket, key, me, lease, stop, what),
                                name=f"lease {key}", daemon=True)
    renewing.start()
    try:
        yield lease
    finally:
        stop.set()
        renewing.join()
        if not lease.lost.is_set():
            with contextlib.suppress(ClientError):  # refused: it was taken over, and is the taker's now
                client.delete_object(Bucket=bucket, Key=key, IfMatch=lease.etag)


def _renew(client, bucket: str, key: str, me: dict, lease: Lease, stop: threading.Event, what: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    while not stop.wait(RENEW_S):
        try:
            lease.etag = _write(client, bucket, key, me, IfMatch=lease.etag)
        except ClientError as error:
            if lost_a_race(error) or is_not_found(error):
                log.error("%s: lost its lease s3://%s/%s to another holder (it was not renewed for %.0f s)", what,
                          bucket, key, TTL_S)
                lease.lost.set()
                return
            log.warning("%s: could not renew its lease (%s); trying again", what, error)
        except BotoCoreError as error:  # the store is down: its lease ages, and is kept if it comes back in time
            log.warning("%s: could not renew its lease (%s); trying again", what, error)


def _write(client, bucket: str, key: str, me: dict, **condition: str) -> str:
    body = json.dumps({**me, "renewed": time.time()}).encode()
    return client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json", **condition)["ETag"]


def _read(client, bucket: str, key: str) -> tuple[dict, str] | None:
    """The lease's body and ETag; None if there is none. A damaged body reads as {} (no holder alive)."""
    from botocore.exceptions import ClientError

    try:
        found = client.get_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if is_not_found(error):
            return None
        raise
    try:
        body = json.loads(found["Body"].read())
    except ValueError:
        body = {}
    return (body if isinstance(body, dict) else {}), found["ETag"]


def _alive(body: dict) -> bool:
    try:
        renewed, pid, host = float(body["renewed"]), int(body["pid"]), str(body["host"])
    except (KeyError, TypeError, ValueError):
        return False  # damaged: no holder can be told from it
    if host == socket.gethostname() and _started(pid) != body.get("started"):
        return False  # its process is gone (or the pid is another's now)
    return time.time() - renewed <= TTL_S


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
