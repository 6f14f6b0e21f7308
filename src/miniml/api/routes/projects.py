from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response

from miniml.api.deps import AdminDep, DbDep, RegistryDep, StoreDep, ViewerDep
from miniml.api.routes.deployments import push_after_commit
from miniml.schemas.projects import ProjectCreate, ProjectRead
from miniml.services import projects
from miniml.tracking import experiment_name

log = logging.getLogger("miniml.api")

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
def delete_project(
    project: str, request: Request, db: DbDep, store: StoreDep, registry: RegistryDep, caller: AdminDep
) -> Response:
    """Delete a project and everything in it: datasets and their files, jobs, deployments (no longer
    served), captured predictions, and its runs and registered models in MLflow, so a project made
    again under the same name starts empty. Refused (409) while a job of it is queued or running;
    when MLflow does not answer (503) the project stays, to be deleted again."""
    with db.begin() as session:
        plan = projects.plan_deletion(session, caller, project)
    if plan.tracked:
        registry.forget_project(project)
    with db.begin() as session:
        project_id = projects.delete_project(session, caller, project)
    push_after_commit(request)  # its deployments stop being served (and capturing) now
    access = request.app.state.mlflow_access
    if access is not None:
        access.forget(experiment_name(project))  # a new project of the name gets its own experiment's id
    # After the commit: a failed delete leaves an orphan object, never a dangling row. (A replica
    # may still flush rows it captured before the push; a later deployment's drift check reads
    # only rows captured since that deployment was made.)
    for prefix in (f"projects/{project_id}/", f"capture/{project}/"):
        try:
            for key in store.list_keys(prefix):
                store.delete(key)
        except Exception as exc:  # the store is away: the rows are gone, the files stay unread
            log.warning("project files not deleted", extra={"prefix": prefix, "error": str(exc)[:200]})
    return Response(status_code=204)
