from __future__ import annotations

from fastapi import APIRouter, Response

from miniml.api.deps import AdminDep, DbDep, ViewerDep
from miniml.schemas.projects import ProjectCreate, ProjectRead
from miniml.services import projects

router = APIRouter(prefix="/api/v1/projects", tags=["projects"])


@router.post("", status_code=201)
def create_project(body: ProjectCreate, db: DbDep, caller: AdminDep) -> ProjectRead:
    """Create a project (a workspace and the unit of tenancy)."""
    with db.begin() as session:
        return ProjectRead.model_validate(projects.create_project(session, caller, body))


@router.get("")
def list_projects(db: DbDep, caller: ViewerDep) -> list[ProjectRead]:
    """List the projects this key may see."""
    with db.begin() as session:
        return [ProjectRead.model_validate(p) for p in projects.list_projects(session, caller)]


@router.get("/{project}")
def read_project(project: str, db: DbDep, caller: ViewerDep) -> ProjectRead:
    """Get one project."""
    with db.begin() as session:
        return ProjectRead.model_validate(projects.read_project(session, caller, project))


@router.delete("/{project}", status_code=204)
def delete_project(project: str, db: DbDep, caller: AdminDep) -> Response:
    """Delete a project and everything in it."""
    with db.begin() as session:
        projects.delete_project(session, caller, project)
    return Response(status_code=204)
