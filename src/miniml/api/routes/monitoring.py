"""Drift checks, live model quality and retraining of a deployment."""

from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request

from miniml.api.deps import (
    AdminDep,
    DbDep,
    EngineerDep,
    IdPath,
    InferenceDep,
    RegistryDep,
    SettingsDep,
    ViewerDep,
    WorkerDep,
)
from miniml.api.routes.deployments import inference_router, push_after_commit
from miniml.api.routes.jobs import submit_after_commit
from miniml.monitoring import traffic
from miniml.schemas.monitoring import (
    DriftContext,
    DriftReportRead,
    DriftReports,
    DriftResult,
    EvaluationContext,
    EvaluationResult,
    FeedbackRecord,
    MonitoringRead,
    MonitoringUpdate,
    QualityRead,
    RetrainingRead,
    TrafficRead,
)
from miniml.services import monitoring
from miniml.services.deployments import read_deployment

log = logging.getLogger("miniml.api")
router = APIRouter(prefix="/api/v1/projects/{project}/deployments", tags=["monitoring"])

Limit = Annotated[int, Query(ge=1, le=1000, description="How many, newest first.")]
Window = Annotated[int, Query(ge=60, le=90 * 86400, description="Seconds of feedback to include.")]


async def submit_monitoring(request: Request) -> None:
    """Hand queued checks and evaluations to Prefect now; if it is down, the api's loop retries."""
    app = request.app
    try:
        await anyio.to_thread.run_sync(app.state.orchestrator.supervise_monitoring, app.state.registry)
    except Exception as exc:  # Prefect down: the loop retries
        log.info("monitoring submission deferred", extra={"error": str(exc)[:200]})


@router.get("/{name}/traffic")
def read_traffic(
    project: str,
    name: str,
    db: DbDep,
    settings: SettingsDep,
    caller: ViewerDep,
    minutes: Annotated[int, Query(ge=1, le=24 * 60, description="How far back.")] = 15,
    step_s: Annotated[int, Query(ge=5, le=3600, description="Seconds between points.")] = 15,
) -> TrafficRead:
    """Live requests/s, errors/s and p95 latency (ms) over the last minutes, and the totals, from
    Prometheus (the inference replicas' own metrics). 503 when Prometheus does not answer."""
    with db.begin() as session:
        dep = read_deployment(session, caller, project, name)
        deployment = dep.name
    url = settings.monitoring.prometheus_url or f"http://127.0.0.1:{settings.monitoring.prometheus_port}"
    step_s = max(step_s, minutes * 60 // 1000)  # at most about a thousand points a series
    return TrafficRead.model_validate(traffic.deployment_traffic(url, deployment, minutes, step_s))


@router.get("/{name}/monitoring")
def read_monitoring(project: str, name: str, db: DbDep, caller: ViewerDep) -> MonitoringRead:
    """The drift schedule and window, and the retraining policy."""
    with db.begin() as session:
        return monitoring.monitoring_read(read_deployment(session, caller, project, name))


@router.put("/{name}/monitoring")
def update_monitoring(project: str, name: str, body: MonitoringUpdate, db: DbDep, caller: AdminDep) -> MonitoringRead:
    """Change the drift schedule or window, or set (null: remove) the retraining policy."""
    with db.begin() as session:
        return monitoring.monitoring_read(monitoring.update_monitoring(session, caller, project, name, body))


@router.post("/{name}/drift/check", status_code=202)
async def check_drift(
    project: str, name: str, request: Request, db: DbDep, registry: RegistryDep, caller: EngineerDep
) -> DriftReportRead:
    """Start a drift check now (a Prefect flow on a worker); poll `GET …/drift` for the report."""

    def create() -> DriftReportRead:
        with db.begin() as session:
            dep = read_deployment(session, caller, project, name)
            return DriftReportRead.model_validate(
                monitoring.create_drift_check(session, registry, dep, trigger="manual")
            )

    report = await anyio.to_thread.run_sync(create)
    await submit_monitoring(request)
    return report


@router.get("/{name}/drift")
def drift_reports(project: str, name: str, db: DbDep, caller: ViewerDep, limit: Limit = 50) -> DriftReports:
    """The latest finished drift report and the history of checks."""
    with db.begin() as session:
        return monitoring.drift_reports(session, caller, project, name, limit=limit)


@router.get("/{name}/drift/{report_id}/context")
def drift_context(
    project: str, name: str, report_id: IdPath, request: Request, db: DbDep, caller: WorkerDep
) -> DriftContext:
    """(worker) What a drift check compares; marks it running."""
    with db.begin() as session:
        return monitoring.drift_context(
            session, caller, project, name, report_id, min_rows=request.app.state.settings.monitoring.drift_min_rows
        )


@router.post("/{name}/drift/{report_id}/result")
async def drift_result(
    project: str,
    name: str,
    report_id: IdPath,
    body: DriftResult,
    request: Request,
    db: DbDep,
    registry: RegistryDep,
    caller: WorkerDep,
) -> DriftReportRead:
    """(worker) Store a finished drift check; over the policy's threshold, a retraining starts."""

    def record() -> tuple[DriftReportRead, int | None]:
        with db.begin() as session:
            report, retraining = monitoring.record_drift(session, registry, caller, project, name, report_id, body)
            return DriftReportRead.model_validate(report), retraining.job_id if retraining else None

    report, job_id = await anyio.to_thread.run_sync(record)
    if job_id is not None:
        await submit_after_commit(request, job_id)
    return report


@router.get("/{name}/quality")
def read_quality(project: str, name: str, db: DbDep, caller: ViewerDep, window_s: Window = 3600) -> QualityRead:
    """Live accuracy and F1 (classification) or RMSE and MAE (regression) from feedback in the window."""
    with db.begin() as session:
        return monitoring.quality(session, caller, project, name, window_s=window_s)


@router.post("/{name}/retrain", status_code=202)
async def retrain(
    project: str, name: str, request: Request, db: DbDep, registry: RegistryDep, caller: AdminDep
) -> RetrainingRead:
    """Retrain now with the policy (or the defaults): train a challenger, score both, promote if better."""

    def create() -> RetrainingRead:
        with db.begin() as session:
            dep = read_deployment(session, caller, project, name)
            return RetrainingRead.model_validate(
                monitoring.create_retraining(session, registry, dep, trigger="manual", caller=caller)
            )

    row = await anyio.to_thread.run_sync(create)
    if row.job_id is not None:
        await submit_after_commit(request, row.job_id)
    return row


@router.get("/{name}/retrainings")
def list_retrainings(project: str, name: str, db: DbDep, caller: ViewerDep, limit: Limit = 50) -> list[RetrainingRead]:
    """Every retraining, newest first: trigger, both scores, promoted or not, and why."""
    with db.begin() as session:
        return monitoring.retrainings(session, caller, project, name, limit=limit)


@router.get("/{name}/retrainings/{retraining_id}/context")
def evaluation_context(
    project: str, name: str, retraining_id: IdPath, db: DbDep, caller: WorkerDep
) -> EvaluationContext:
    """(worker) Champion, challenger and the held-out data both are scored on."""
    with db.begin() as session:
        return monitoring.evaluation_context(session, caller, project, name, retraining_id)


@router.post("/{name}/retrainings/{retraining_id}/result")
def evaluation_result(
    project: str,
    name: str,
    retraining_id: IdPath,
    body: EvaluationResult,
    request: Request,
    db: DbDep,
    registry: RegistryDep,
    caller: WorkerDep,
) -> RetrainingRead:
    """(worker) Both scores; the api promotes and redeploys only if the challenger wins by the margin."""
    with db.begin() as session:
        row, promoted = monitoring.decide(session, registry, caller, project, name, retraining_id, body)
        read = RetrainingRead.model_validate(row)
    if promoted:
        push_after_commit(request)
    return read


@inference_router.post("/feedback")
def record_feedback(body: list[FeedbackRecord], db: DbDep, caller: InferenceDep) -> dict[str, int]:
    """(inference) Labels joined with the predictions they are for."""
    with db.begin() as session:
        return {"stored": monitoring.record_feedback(session, body)}
