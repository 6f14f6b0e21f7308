from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from miniml.api.deps import AdminDep, DbDep, EngineerDep, RegistryDep, VersionPath, ViewerDep
from miniml.api.routes.deployments import push_after_commit
from miniml.domain.limits import MAX_ID
from miniml.schemas.models import ModelComparison, ModelRead, ModelVersionRead, PromoteRequest
from miniml.services import deployments, models

router = APIRouter(prefix="/api/v1/projects/{project}/models", tags=["models"])


@router.get("")
def list_models(project: str, db: DbDep, registry: RegistryDep, caller: ViewerDep) -> list[ModelRead]:
    """Registered models of the project."""
    with db.begin() as session:
        return models.list_models(session, registry, caller, project)


@router.get("/{model}")
def read_model(project: str, model: str, db: DbDep, registry: RegistryDep, caller: ViewerDep) -> ModelRead:
    """One model with its aliases."""
    with db.begin() as session:
        return models.read_model(session, registry, caller, project, model)


@router.get("/{model}/versions")
def list_model_versions(
    project: str, model: str, db: DbDep, registry: RegistryDep, caller: ViewerDep
) -> list[ModelVersionRead]:
    """Versions with metrics, params, aliases and lineage (job, dataset version and sha256)."""
    with db.begin() as session:
        return models.list_versions(session, registry, caller, project, model)


@router.get("/{model}/compare")
def compare_model_versions(
    project: str,
    model: str,
    db: DbDep,
    registry: RegistryDep,
    caller: ViewerDep,
    a: Annotated[int, Query(ge=1, le=MAX_ID, description="The first version.")],
    b: Annotated[int, Query(ge=1, le=MAX_ID, description="The second version.")],
) -> ModelComparison:
    """Two versions side by side, with metric differences (b - a)."""
    with db.begin() as session:
        return models.compare(session, registry, caller, project, model, str(a), str(b))


@router.get("/{model}/versions/{version}")
def read_model_version(
    project: str, model: str, version: VersionPath, db: DbDep, registry: RegistryDep, caller: ViewerDep
) -> ModelVersionRead:
    """One version."""
    with db.begin() as session:
        return models.read_version(session, registry, caller, project, model, str(version))


@router.post("/{model}/versions/{version}/promote")
def promote_model_version(
    project: str,
    model: str,
    version: VersionPath,
    body: PromoteRequest,
    request: Request,
    db: DbDep,
    registry: RegistryDep,
    caller: EngineerDep,
) -> ModelVersionRead:
    """Move the staging or production alias (and MLflow stage) to this version; production needs admin."""
    with db.begin() as session:
        read = models.promote(session, registry, caller, project, model, str(version), body.stage)
    push_after_commit(request)
    return read


@router.delete("/{model}/versions/{version}", status_code=204)
def delete_model_version(
    project: str, model: str, version: VersionPath, db: DbDep, registry: RegistryDep, caller: AdminDep
) -> Response:
    """Delete a version; refused (409) while a deployment serves it."""
    with db.begin() as session:
        served = deployments.served_versions(session, registry)
        models.delete_version(session, registry, caller, project, model, str(version), served)
    return Response(status_code=204)
