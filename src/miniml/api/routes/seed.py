"""The seed's original routes, kept working beside /api/v1."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response

from miniml.api.deps import AdminDep, DbDep, EngineerDep, SettingsDep, StoreDep, ViewerDep
from miniml.api.routes import jobs as jobs_routes
from miniml.api.routes.datasets import upload_dataset_version
from miniml.errors import InvalidInput
from miniml.schemas.datasets import DatasetVersionRead, SeedValidationRequest, ValidationReport
from miniml.schemas.jobs import JobCreate, JobRead, SeedTrainRequest
from miniml.schemas.projects import ProjectCreate, ProjectRead
from miniml.services import datasets, projects

router = APIRouter(tags=["seed"])


@router.post("/projects", status_code=201)
def create_project_seed(body: ProjectCreate, db: DbDep, caller: AdminDep) -> ProjectRead:
    """Create a project (seed route; same as POST /api/v1/projects)."""
    with db.begin() as session:
        return ProjectRead.model_validate(projects.create_project(session, caller, body))


@router.post("/datasets/upload", status_code=201)
async def upload_dataset_seed(
    project: str,
    request: Request,
    response: Response,
    db: DbDep,
    store: StoreDep,
    settings: SettingsDep,
    caller: EngineerDep,
    name: str | None = None,
) -> DatasetVersionRead:
    """Upload a dataset (seed route: `?project=demo`, form field `file`); returns `s3_uri`."""
    return await upload_dataset_version(request, response, db, store, settings, caller, project, name)


@router.post("/experiments/train", status_code=202)
async def train_seed(
    body: SeedTrainRequest,
    request: Request,
    response: Response,
    db: DbDep,
    store: StoreDep,
    caller: EngineerDep,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> JobRead:
    """Queue a training job (seed route); the answer carries the job id at once."""
    spec = JobCreate(
        dataset_uri=body.dataset_s3_uri,
        target=body.target,
        model_name=body.model_name,
        test_size=body.test_size,
        max_trials=body.max_trials,
    )
    return await jobs_routes.create_job(body.project, spec, request, response, db, store, caller, idempotency_key)


@router.post("/datasets/validate")
def validate_dataset_seed(
    body: SeedValidationRequest, db: DbDep, store: StoreDep, caller: ViewerDep
) -> ValidationReport:
    """Validate a stored version by its `dataset_s3_uri` (or `dataset` and `version`) against rules."""
    with db.begin() as session:
        if body.dataset_s3_uri:
            row = datasets.read_version_by_uri(session, store, caller, body.project, body.dataset_s3_uri)
        elif body.dataset and body.version:
            row = datasets.read_version(session, caller, body.project, body.dataset, body.version)
        else:
            raise InvalidInput("Name the dataset version: 'dataset_s3_uri', or 'dataset' and 'version'.")
    return datasets.validate_version(row, store, body)
