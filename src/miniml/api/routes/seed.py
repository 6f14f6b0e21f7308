"""The seed's original routes, kept working beside /api/v1."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from sqlalchemy.orm import Session

from miniml.api.deps import AdminDep, DbDep, EngineerDep, RegistryDep, SettingsDep, StoreDep, ViewerDep
from miniml.api.routes import jobs as jobs_routes
from miniml.api.routes.datasets import upload_dataset_version
from miniml.api.routes.deployments import push_after_commit
from miniml.domain.tenancy import Caller
from miniml.errors import InvalidInput
from miniml.schemas.datasets import DatasetVersionRead, SeedValidationRequest, ValidationReport
from miniml.schemas.deployments import DeploymentCreate, DeploymentRead, DeploymentUpdate, SeedDeployRequest
from miniml.schemas.jobs import JobCreate, JobRead, SeedTrainRequest
from miniml.schemas.models import ModelVersionRead, SeedPromoteRequest
from miniml.schemas.projects import ProjectCreate, ProjectRead
from miniml.services import datasets, deployments, models, projects

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


def _seed_model(session: Session, caller: Caller, project: str | None, model_name: str) -> tuple[str, str]:
    """The seed names models without a project: take it from the body, the name's prefix, or the key."""
    if project:
        return project, model_name.removeprefix(f"{project}.")
    visible = [p.name for p in projects.list_projects(session, caller)]
    head, _, rest = model_name.partition(".")
    if rest and head in visible:
        return head, rest
    if len(visible) == 1:
        return visible[0], model_name
    raise InvalidInput(
        f'Cannot tell which project {model_name!r} belongs to; add "project" to the body or use <project>.<model>.'
    )


@router.post("/models/promote")
def promote_seed(
    body: SeedPromoteRequest, request: Request, db: DbDep, registry: RegistryDep, caller: EngineerDep
) -> ModelVersionRead:
    """Promote a version to Staging or Production (seed route)."""
    with db.begin() as session:
        project, model = _seed_model(session, caller, body.project, body.model_name)
        read = models.promote(session, registry, caller, project, model, str(body.version), body.to_stage)
    push_after_commit(request)
    return read


@router.post("/deploy", status_code=201)
def deploy_seed(
    body: SeedDeployRequest, request: Request, response: Response, db: DbDep, registry: RegistryDep, caller: AdminDep
) -> DeploymentRead:
    """Deploy a model by stage (seed route); the deployment takes the model's name, or moves if it exists."""
    refused = None
    with db.begin() as session:
        project, model = _seed_model(session, caller, body.project, body.model_name)
        name = body.name or model.lower().replace(".", "-").replace("_", "-")
        target = str(body.version) if body.version else (body.stage or "staging")
        existing = [d for d in deployments.list_deployments(session, caller, project) if d.name == name]
        if existing:
            dep, refused = deployments.update_deployment(
                session, registry, caller, project, name, DeploymentUpdate(target=target)
            )
            response.status_code = 200
        else:
            dep = deployments.create_deployment(
                session, registry, caller, project, DeploymentCreate(name=name, model_name=model, target=target)
            )
        read = deployments.to_read(session, registry, dep, request.app.state.settings.inference_url)
    if refused is not None:
        raise refused  # recorded on the deployment; nothing switched
    push_after_commit(request)
    return read


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
