"""What Ray runs for compound: every submission, one's status with its links, its driver's log whole or as it
grows."""

import asyncio
import dataclasses

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse

from server.access import Context, ServerParts, Viewer
from server.queue import CANCELLED, QUEUED

router = APIRouter()
FOLLOW_POLL_S = 1.0


def _cluster(parts: ServerParts):
    from jobs.submit import SubmissionError

    try:
        return parts.queue.client()
    except SubmissionError as error:
        raise HTTPException(503, str(error)) from None


@router.get("/api/jobs", name="job.list")
def list_jobs(_: Viewer, parts: Context) -> list[dict]:
    """Every compound submission Ray knows (jobs, sweeps, pipelines), then the queue's."""
    from server import job_views

    return [dataclasses.asdict(s) for s in job_views.submissions(_cluster(parts), parts.settings(), parts.queue)]


@router.get("/api/jobs/{ref}", name="job.status")
def job_status(ref: str, _: Viewer, parts: Context) -> dict:
    """A submission by id, or a job's latest by name, with its Ray dashboard and MLflow run links."""
    from jobs.submit import SubmissionError
    from server import job_views

    client, stack = _cluster(parts), parts.settings()
    try:
        found = job_views.find(client, stack, ref, parts.queue)
    except SubmissionError as error:
        raise HTTPException(404, str(error)) from None
    return {**dataclasses.asdict(found), **job_views.links(client, stack, found)}


@router.get("/api/jobs/{ref}/logs", name="job.logs")
def job_logs(ref: str, _: Viewer, parts: Context) -> dict:
    """Its driver's log (Ray's, or the copy kept on S3), a retried one's earlier attempts first."""
    from jobs.submit import SubmissionError
    from server import job_views

    try:
        try:
            client = parts.queue.client()
        except SubmissionError:
            client = None  # the kept copies still answer
        return dataclasses.asdict(job_views.log(parts.settings(), ref, client, parts.queue))
    except SubmissionError as error:
        raise HTTPException(404, str(error)) from None


@router.get("/api/jobs/{ref}/logs/follow", name="job.follow")
async def follow_logs(ref: str, _: Viewer, parts: Context) -> StreamingResponse:
    """Its driver's log as it grows, until it ends (one still queued: once it starts); then GET the job
    for how it ended."""
    from jobs.submit import SubmissionError
    from server import job_views

    client, stack, queue = _cluster(parts), parts.settings(), parts.queue
    try:
        found = await asyncio.to_thread(job_views.find, client, stack, ref, queue)
    except SubmissionError as error:
        raise HTTPException(404, str(error)) from None

    async def text():
        while (entry := await asyncio.to_thread(queue.find, found.submission_id)) is not None \
                and entry.state == QUEUED:
            await asyncio.sleep(FOLLOW_POLL_S)
        if entry is not None and entry.state == CANCELLED:
            return
        async for chunk in client.ray.tail_job_logs(found.submission_id):
            yield chunk
    return StreamingResponse(text(), media_type="text/plain", headers={"X-Submission-Id": found.submission_id})
