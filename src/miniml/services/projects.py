from __future__ import annotations

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


def delete_project(session: Session, caller: Caller, name: str) -> None:
    project = read_project(session, caller, name)
    session.delete(project)
    session.flush()
