from __future__ import annotations

import threading

import anyio
from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session, sessionmaker

from miniml.api.deps import AdminDep, DbDep, EngineerDep, InferenceDep, RegistryDep, StoreDep, ViewerDep
from miniml.api.routes.jobs import submit_after_commit
from miniml.db import tables
from miniml.domain.roles import Role
from miniml.domain.tenancy import Caller
from miniml.schemas.deployments import (
    DeploymentCreate,
    DeploymentEventRead,
    DeploymentRead,
    DeploymentUpdate,
    DesiredDeployment,
    ReplicaReport,
    ShadowReport,
)
from miniml.schemas.jobs import BatchCreate, JobRead
from miniml.services import deployments, jobs, keys
from miniml.tracking.registry import Registry

router = APIRouter(prefix="/api/v1/projects/{project}/deployments", tags=["deployments"])
inference_router = APIRouter(prefix="/api/v1/inference", tags=["inference"])


def push_after_commit(request: Request) -> None:
    """Tell the inference replicas to reconcile now, off the request path."""
    settings = request.app.state.settings
    with request.app.state.db.begin() as session:
        urls = [r.url for r in deployments.live_replicas(session) if r.url]
        service = keys.service_key_id(session, Role.inference)
    urls.append(settings.inference_url)
    # The replicas take a push only from a credential they can check: a short token for the
    # inference service's own key. Without one they still converge on their timer.
    token = (
        keys.issue_token(
            Caller(key_id=service, role=Role.inference, projects=None), secret=request.app.state.jwt_secret, ttl_s=60
        )
        if service
        else None
    )
    threading.Thread(target=deployments.push, args=(urls, token), daemon=True).start()


def _read(request: Request, session: Session, registry: Registry, dep: tables.Deployment) -> DeploymentRead:
    return deployments.to_read(session, registry, dep, request.app.state.settings.inference_url)


def _read_after_commit(
    request: Request, db: sessionmaker[Session], registry: Registry, caller: Caller, project: str, name: str
) -> DeploymentRead:
    """The answer of a change, read once it is committed: resolving asks MLflow, which must not
    happen while the change holds the DB's write lock."""
    with db.begin() as session:
        return _read(request, session, registry, deployments.read_deployment(session, caller, project, name))


@router.post("", status_code=201)
def create_deployment(
    project: str, body: DeploymentCreate, request: Request, db: DbDep, registry: RegistryDep, caller: AdminDep
) -> DeploymentRead:
    """Serve a model by alias, version, or a traffic split between versions."""
    with db.begin() as session:
        deployments.create_deployment(session, registry, caller, project, body)
    push_after_commit(request)
    return _read_after_commit(request, db, registry, caller, project, body.name)


@router.get("")
def list_deployments(
    project: str, request: Request, db: DbDep, registry: RegistryDep, caller: ViewerDep
) -> list[DeploymentRead]:
    """The project's deployments with what each replica serves."""
    with db.begin() as session:
        return [_read(request, session, registry, d) for d in deployments.list_deployments(session, caller, project)]


@router.get("/{name}")
def read_deployment(
    project: str, name: str, request: Request, db: DbDep, registry: RegistryDep, caller: ViewerDep
) -> DeploymentRead:
    """Desired target, what each inference replica serves, ready or not, last error."""
    with db.begin() as session:
        return _read(request, session, registry, deployments.read_deployment(session, caller, project, name))


@router.patch("/{name}")
def update_deployment(
    project: str,
    name: str,
    body: DeploymentUpdate,
    request: Request,
    db: DbDep,
    registry: RegistryDep,
    caller: AdminDep,
) -> DeploymentRead:
    """Point the deployment at a new target; replicas load it, check it and predict example rows first,
    then switch (no downtime). A version needing columns the live one does not take is refused (409)
    unless `allow_schema_change` is true; a refusal leaves the old version serving."""
    with db.begin() as session:
        _dep, refused = deployments.update_deployment(session, registry, caller, project, name, body)
    if refused is not None:
        raise refused  # recorded on the deployment and in its history; nothing switched
    push_after_commit(request)
    return _read_after_commit(request, db, registry, caller, project, name)


@router.post("/{name}/rollback")
def rollback_deployment(
    project: str, name: str, request: Request, db: DbDep, registry: RegistryDep, caller: AdminDep
) -> DeploymentRead:
    """Go back to the previous target."""
    with db.begin() as session:
        deployments.rollback_deployment(session, caller, project, name)
    push_after_commit(request)
    return _read_after_commit(request, db, registry, caller, project, name)


@router.delete("/{name}", status_code=204)
def delete_deployment(project: str, name: str, request: Request, db: DbDep, caller: AdminDep) -> Response:
    """Stop serving and delete the deployment (its history stays)."""
    with db.begin() as session:
        deployments.delete_deployment(session, caller, project, name)
    push_after_commit(request)
    return Response(status_code=204)


@router.get("/{name}/history")
def deployment_history(project: str, name: str, db: DbDep, caller: ViewerDep) -> list[DeploymentEventRead]:
    """Every change to the deployment, oldest first."""
    with db.begin() as session:
        return deployments.history(session, caller, project, name)


@router.post("/{name}/batch", status_code=202)
async def create_batch_prediction(
    project: str,
    name: str,
    body: BatchCreate,
    request: Request,
    db: DbDep,
    store: StoreDep,
    registry: RegistryDep,
    caller: EngineerDep,
) -> JobRead:
    """Predict a whole dataset version (a Prefect flow, like a job); writes a new dataset version with a `prediction` column."""

    def create() -> JobRead:
        with db.begin() as session:
            job = jobs.create_batch_job(session, store, registry, caller, project, name, body)
            return jobs.to_read(session, job, mlflow_ui=request.app.state.settings.mlflow_public_url)

    job = await anyio.to_thread.run_sync(create)
    await submit_after_commit(request, job.id)
    return job


@router.get("/{name}/shadow")
def shadow_report(project: str, name: str, db: DbDep, caller: ViewerDep) -> ShadowReport:
    """How the shadow version agrees with the live one, and both latencies."""
    with db.begin() as session:
        return deployments.shadow_report(session, caller, project, name)


@inference_router.get("/desired")
def desired_state(db: DbDep, registry: RegistryDep, caller: InferenceDep) -> list[DesiredDeployment]:
    """(inference) Every deployment with the versions and weights it should serve now."""
    with db.begin() as session:
        return deployments.desired_state(session, registry)


@inference_router.post("/replicas", status_code=204)
def report_replica(body: ReplicaReport, request: Request, db: DbDep, caller: InferenceDep) -> Response:
    """(inference) What a replica serves now."""
    with db.begin() as session:
        rolled_back = deployments.record_replica(session, body)
    if rolled_back:
        push_after_commit(request)
    return Response(status_code=204)
