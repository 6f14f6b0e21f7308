"""The seed's original routes, kept working beside /api/v1."""

from __future__ import annotations

from fastapi import APIRouter

from miniml.api.deps import AdminDep, DbDep
from miniml.schemas.projects import ProjectCreate, ProjectRead
from miniml.services import projects

router = APIRouter(tags=["seed"])


@router.post("/projects", status_code=201)
def create_project_seed(body: ProjectCreate, db: DbDep, caller: AdminDep) -> ProjectRead:
    """Create a project (seed route; same as POST /api/v1/projects)."""
    with db.begin() as session:
        return ProjectRead.model_validate(projects.create_project(session, caller, body))
