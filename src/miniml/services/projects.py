from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from miniml.db import tables
from miniml.domain.names import check_slug
from miniml.domain.tenancy import Caller
from miniml.errors import Conflict, NotFound
from miniml.schemas.projects import ProjectCreate


def create_project(session: Session, caller: Caller, body: ProjectCreate) -> tables.Project:
    name = check_slug(body.name, what="Project")
    taken = Conflict(f"Project {name!r} already exists; pick another name.")
    if session.scalar(select(tables.Project.id).where(tables.Project.name == name)) is not None:
        raise taken
    project = tables.Project(name=name, description=body.description, created_by=caller.key_id)
    session.add(project)
    try:
        session.flush()
    except IntegrityError:  # created by another request since the check: the unique index decides
        raise taken from None
    return project


def list_projects(session: Session, caller: Caller) -> list[tables.Project]:
    query = select(tables.Project).order_by(tables.Project.name)
    if caller.projects is not None:
        query = query.where(tables.Project.name.in_(sorted(caller.projects)))
    return list(session.scalars(query))


def read_project(session: Session, caller: Caller, name: str) -> tables.Project:
    """The project, or NotFound when it does not exist or the caller may not see it."""
    caller.require_project(name)
    project = session.scalar(select(tables.Project).where(tables.Project.name == name))
    if project is None:
        raise NotFound(f"Project {name!r} does not exist.")
    return project


@dataclass(frozen=True)
class Deletion:
    project_id: int
    # A job ran in it: MLflow holds its runs, and its models if any registered (only jobs write there).
    tracked: bool


def plan_deletion(session: Session, caller: Caller, name: str) -> Deletion:
    """What deleting the project involves; a Conflict while a job of it is queued or running (it
    would write runs and models into MLflow after they were deleted)."""
    project = read_project(session, caller, name)
    _refuse_live_jobs(session, project)
    ran = session.scalar(select(tables.Job.id).where(tables.Job.project_id == project.id).limit(1))
    return Deletion(project.id, ran is not None)


def delete_project(session: Session, caller: Caller, name: str) -> int:
    """Delete the project's rows (everything in it goes with them); return its id."""
    project = read_project(session, caller, name)
    _refuse_live_jobs(session, project)  # again: a job may have been submitted since the plan
    project_id = project.id
    session.delete(project)
    session.flush()
    return project_id


def _refuse_live_jobs(session: Session, project: tables.Project) -> None:
    live = session.scalars(
        select(tables.Job.id)
        .where(tables.Job.project_id == project.id, tables.Job.state.in_(("queued", "running")))
        .order_by(tables.Job.id)
    ).all()
    if live:
        listed = ", ".join(f"job {j}" for j in live[:10]) + (f" and {len(live) - 10} more" if len(live) > 10 else "")
        raise Conflict(
            f"Project {project.name!r} still has {listed} queued or running; cancel them "
            f"(POST /api/v1/projects/{project.name}/jobs/<id>/cancel) and delete the project once they have ended."
        )
