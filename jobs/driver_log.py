"""A submitted driver's log kept on S3, beside what Ray keeps: Ray holds a job's log in its head's session
dir, and a restarted head knows neither the job nor its log (ray-project/ray#44218). The driver's
output (its stdout and stderr, at the file descriptors, so workers' lines Ray forwards and any child's
output come too) is copied to s3://<checkpoints bucket>/driver-logs/<submission id>.log every
UPLOAD_S while it runs, and once more when it ends; `compound job logs` reads it there when Ray no
longer knows the submission."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

from cluster.storage import S3Access, is_not_found

log = logging.getLogger(__name__)

LOGS_PREFIX = "driver-logs"
UPLOAD_S = 10.0
CHUNK = 65536


def log_key(submission_id: str) -> str:
    return f"{LOGS_PREFIX}/{submission_id}.log"


@contextlib.contextmanager
def kept_on_s3(s3: S3Access, bucket: str, submission_id: str) -> Iterator[None]:
    """Copy everything this process writes to stdout and stderr to the submission's log on S3, while the
    block runs; the output still reaches where it went before (Ray's job log)."""
    client, key = s3.client(), log_key(submission_id)
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    saved = os.dup(1), os.dup(2)
    kept, lock, ended = bytearray(), threading.Lock(), threading.Event()

    def copy() -> None:  # the pipe → where the output went before, and the copy kept here
        while chunk := os.read(read_end, CHUNK):
            os.write(saved[0], chunk)
            with lock:
                kept.extend(chunk)

    def upload() -> None:
        with lock:
            body = bytes(kept)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="text/plain; charset=utf-8")
        except Exception as error:  # noqa: BLE001 — a store outage must not end the job; the next upload catches up
            log.warning("could not copy the driver's log to s3://%s/%s: %s", bucket, key, error)

    def keep_uploading() -> None:
        while not ended.wait(UPLOAD_S):
            upload()

    copier = threading.Thread(target=copy, name="driver log", daemon=True)
    uploader = threading.Thread(target=keep_uploading, name="driver log upload", daemon=True)
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    copier.start()
    uploader.start()
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(write_end)  # the copier reads to the end (unless a child still holds the pipe)
        copier.join(timeout=5)
        ended.set()
        uploader.join()
        upload()
        for fd in (read_end, *saved):
            with contextlib.suppress(OSError):
                os.close(fd)


def read_kept(s3: S3Access, bucket: str, ref: str) -> tuple[str, str] | None:
    """A kept log by submission id, or the latest kept one of a job, sweep or pipeline by its name:
    (submission id, text); None if there is none."""
    from botocore.exceptions import ClientError

    client = s3.client()
    try:
        return ref, _text(client, bucket, log_key(ref))
    except ClientError as error:
        if not is_not_found(error):
            raise
    numbered = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{LOGS_PREFIX}/{ref}-"):
        for item in page.get("Contents", []):
            if match := re.fullmatch(rf"{LOGS_PREFIX}/{re.escape(ref)}-(\d+)\.log", item["Key"]):
                numbered.append((int(match.group(1)), item["Key"]))
    if not numbered:
        return None
    _, key = max(numbered)
    return key.removeprefix(f"{LOGS_PREFIX}/").removesuffix(".log"), _text(client, bucket, key)


def _text(client, bucket: str, key: str) -> str:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read().decode(errors="replace")
