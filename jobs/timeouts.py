"""`max_runtime`: a submission that has run longer than its spec allows is stopped and marked TIMED_OUT.

The compound server looks every CHECK_S seconds (`stop_overdue`). Ray only knows STOPPED, so the mark is
an object beside the drivers' kept logs, `driver-logs/timed-out/<submission id>.json`, which the CLI
reads to show TIMED_OUT (listing the marks alone, not every log). Stopping keeps the checkpoints: submitting the job again resumes it.
"""

from __future__ import annotations

import json
import logging
import time

from cluster.storage import S3Access
from jobs.driver_log import LOGS_PREFIX
from jobs.submit import JobsClient, Submission

log = logging.getLogger(__name__)

CHECK_S = 5.0
TIMED_OUT = "TIMED_OUT"
MARKS = f"{LOGS_PREFIX}/timed-out/"


def overdue(submissions: list[Submission], now: float) -> list[Submission]:
    return [s for s in submissions if s.active and s.max_runtime_s is not None and s.start_time is not None
            and now - s.start_time > s.max_runtime_s]


def stop_overdue(client: JobsClient, s3: S3Access, bucket: str) -> list[Submission]:
    """Stop every active submission past its max_runtime, marking each TIMED_OUT first; the ones stopped."""
    stopped = []
    for submission in overdue(client.submissions(), time.time()):
        s3.client().put_object(Bucket=bucket, Key=_mark_key(submission.submission_id), Body=json.dumps({
            "max_runtime_s": submission.max_runtime_s, "stopped_at": time.time()}).encode())
        log.warning("submission %s of %s ran past its max_runtime of %g s: stopping it", submission.submission_id,
                    submission.job, submission.max_runtime_s)
        client.ray.stop_job(submission.submission_id)
        stopped.append(submission)
    return stopped


def with_timeouts(submissions: list[Submission], s3: S3Access, bucket: str) -> list[Submission]:
    """The submissions, those stopped for running too long shown as TIMED_OUT."""
    from dataclasses import replace

    client, marked = s3.client(), set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=MARKS):
        marked |= {item["Key"] for item in page.get("Contents", [])}
    return [replace(s, status=TIMED_OUT, message=f"stopped after its max_runtime of {s.max_runtime_s:g} s")
            if _mark_key(s.submission_id) in marked and not s.active else s for s in submissions]


def _mark_key(submission_id: str) -> str:
    return f"{MARKS}{submission_id}.json"
