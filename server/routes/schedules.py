"""Pipelines on a cron or on new data: add, list, their firings, pause, resume, remove."""

from collections.abc import Callable

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from server.access import Context, Submitter, Viewer, audited

router = APIRouter()


class NewSchedule(BaseModel):
    spec: str = Field(max_length=1_000_000, description="the pipeline spec's YAML, its job and sweep files read in")
    cron: str | None = Field(default=None, max_length=200, description="five fields, UTC")
    data_prefix: str | None = Field(default=None, max_length=1000, description="run on each new manifest here")
    poll_s: float = Field(default=60.0, ge=1)
    name: str | None = Field(default=None, max_length=63)
    replace: bool = False


def _scheduling(work: Callable):
    from jobs.spec import SpecError
    from pipelines.scheduler import ScheduleError

    try:
        return work()
    except SpecError as error:
        raise HTTPException(422, str(error)) from None
    except ScheduleError as error:
        raise HTTPException(404 if str(error).startswith("no schedule") else 409, str(error)) from None


@router.post("/api/schedules", name="schedule.add", status_code=201)
def add_schedule(new: NewSchedule, user: Submitter, parts: Context) -> dict:
    from pipelines.scheduler import schedule_pipeline, shown
    from pipelines.spec import load_pipeline_spec_text

    def add() -> dict:
        spec = load_pipeline_spec_text(new.spec, "the submitted pipeline")
        return shown(schedule_pipeline(parts.schedules, spec, parts.settings(), cron=new.cron,
                                       data_prefix=new.data_prefix, poll_s=new.poll_s, name=new.name,
                                       replace=new.replace))
    return audited(parts, user, "schedule.add", new.name or "(the pipeline's name)", lambda: _scheduling(add),
                   target_of=lambda added: added["name"])


@router.get("/api/schedules", name="schedule.list")
def list_schedules(_: Viewer, parts: Context) -> list[dict]:
    from pipelines.scheduler import list_schedules, shown

    return [shown(s) for s in list_schedules(parts.schedules)]


@router.get("/api/schedules/history", name="schedule.history")
def schedule_history(_: Viewer, parts: Context, name: str | None = None, limit: int = 50) -> list[dict]:
    from pipelines.scheduler import history, jsonable

    return [jsonable(row) for row in history(parts.schedules, name, max(1, min(limit, 10_000)))]


@router.post("/api/schedules/{name}/pause", name="schedule.pause")
def pause_schedule(name: str, user: Submitter, parts: Context) -> dict:
    from pipelines.scheduler import pause_schedule, shown

    return audited(parts, user, "schedule.pause", name,
                   lambda: _scheduling(lambda: shown(pause_schedule(parts.schedules, name))))


@router.post("/api/schedules/{name}/resume", name="schedule.resume")
def resume_schedule(name: str, user: Submitter, parts: Context) -> dict:
    from pipelines.scheduler import resume_schedule, shown

    return audited(parts, user, "schedule.resume", name,
                   lambda: _scheduling(lambda: shown(resume_schedule(parts.schedules, name))))


@router.delete("/api/schedules/{name}", name="schedule.remove")
def remove_schedule(name: str, user: Submitter, parts: Context) -> dict:
    from pipelines.scheduler import remove_schedule

    audited(parts, user, "schedule.remove", name, lambda: _scheduling(lambda: remove_schedule(parts.schedules, name)))
    return {"name": name, "removed": True}
