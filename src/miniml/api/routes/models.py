from __future__ import annotations

import uuid
from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Query, Request, Response

from miniml.api.deps import (
    AdminDep,
    DbDep,
    EngineerDep,
    RegistryDep,
    SettingsDep,
    StoreDep,
    VersionPath,
    ViewerDep,
)
from miniml.api.routes.deployments import push_after_commit
from miniml.api.routes.jobs import submit_after_commit
from miniml.api.uploads import receive_upload
from miniml.domain.limits import MAX_ID
from miniml.domain.names import check_name
from miniml.domain.tenancy import Caller
from miniml.errors import InvalidInput
from miniml.schemas.jobs import ImportCreate, JobRead
from miniml.schemas.models import ApprovalRequest, ModelComparison, ModelRead, ModelVersionRead, PromoteRequest
from miniml.services import deployments, jobs, models, projects

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


def _import_project_id(db: DbDep, caller: Caller, project: str, model: str) -> int:
    with db.begin() as session:
        check_name(model, what="Model")
        return projects.read_project(session, caller, project).id


_MULTIPART_FILE = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "model.skops"}},
                }
            }
        },
    }
}


@router.post("/{model}/versions", status_code=202, openapi_extra=_MULTIPART_FILE)
async def import_model_version(
    project: str,
    model: str,
    request: Request,
    db: DbDep,
    store: StoreDep,
    settings: SettingsDep,
    caller: EngineerDep,
    dataset: Annotated[str, Query(max_length=128, description="Rows whose columns (less `target`) are the input.")],
    version: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Its version; default the latest.")] = None,
    target: Annotated[str | None, Query(max_length=128, description="A column the model does not take.")] = None,
) -> JobRead:
    """Import a model built elsewhere: a scikit-learn compatible pipeline saved with skops (multipart field `file`).

    A worker checks every type in it against the platform's allowlist (never unpickling anything),
    predicts on the dataset's rows, registers it with their columns as its signature and signs it;
    answers the job at once (202). Pickle files are refused.
    """
    body = ImportCreate(dataset=dataset, version=version, target=target)
    # An unknown project or a bad name is refused before a single byte is stored.
    project_id = await anyio.to_thread.run_sync(_import_project_id, db, caller, project, model)
    upload = await receive_upload(request, tmp_dir=settings.data_dir / "tmp", max_bytes=settings.api.max_upload_bytes)
    try:
        with open(upload.path, "rb") as fh:
            magic = fh.read(4)
        if not upload.filename.lower().endswith(".skops") or magic != b"PK\x03\x04":
            raise InvalidInput(
                f"{upload.filename or 'The file'} is not a skops file; save the model with "
                "skops.io.dump(model, 'model.skops') (pickle and joblib files are not taken)."
            )
        key = f"projects/{project_id}/imports/{uuid.uuid4().hex}.skops"
        await anyio.to_thread.run_sync(lambda: store.put_file(key, upload.path, move=True))
    finally:
        upload.discard()

    def create() -> JobRead:
        try:
            with db.begin() as session:
                job = jobs.create_import_job(session, store, caller, project, model, body, key=key)
                return jobs.to_read(session, job, mlflow_ui=settings.mlflow_public_url)
        except BaseException:
            store.delete(key)
            raise

    read = await anyio.to_thread.run_sync(create)
    await submit_after_commit(request, read.id)
    return read


@router.get("/{model}/versions/{version}")
def read_model_version(
    project: str, model: str, version: VersionPath, db: DbDep, registry: RegistryDep, caller: ViewerDep
) -> ModelVersionRead:
    """One version."""
    with db.begin() as session:
        return models.read_version(session, registry, caller, project, model, str(version))


@router.get("/{model}/versions/{version}/plots")
def list_model_version_plots(
    project: str, model: str, version: VersionPath, db: DbDep, registry: RegistryDep, caller: ViewerDep
) -> list[str]:
    """The plots the version's training job logged: confusion_matrix or residuals, feature_importances,
    parameter_importances, optimisation_history (whichever apply)."""
    with db.begin() as session:
        return models.plots(session, registry, caller, project, model, str(version))


@router.get(
    "/{model}/versions/{version}/plots/{plot}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The plot as a PNG."}},
)
def read_model_version_plot(
    project: str,
    model: str,
    version: VersionPath,
    plot: Annotated[str, Path(pattern=r"^[a-z_]{1,64}$")],
    db: DbDep,
    registry: RegistryDep,
    caller: ViewerDep,
) -> Response:
    """One plot as a PNG."""
    with db.begin() as session:
        png = models.plot(session, registry, caller, project, model, str(version), plot)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.post("/{model}/versions/{version}/approval")
def decide_model_version_approval(
    project: str,
    model: str,
    version: VersionPath,
    body: ApprovalRequest,
    request: Request,
    db: DbDep,
    registry: RegistryDep,
    caller: EngineerDep,
) -> ModelVersionRead:
    """Production approval, as in SageMaker: `request` (engineer or admin) asks for it with a note;
    `approve` or `reject` (admin) decides, with a note. An approved version becomes production. The
    status, who and why are on the version and in the audit log."""
    request.state.audit_detail = f"{body.action}: {body.note}"
    with db.begin() as session:
        read = models.decide_approval(session, registry, caller, project, model, str(version), body)
    if body.action == "approve":
        push_after_commit(request)
    return read


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
