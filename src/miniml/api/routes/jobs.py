from __future__ import annotations

import logging
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy.orm import Session

from miniml.api.deps import AfterQuery, DbDep, EngineerDep, IdPath, RegistryDep, StoreDep, ViewerDep, WorkerDep
from miniml.db import tables
from miniml.domain.jobs import JobState
from miniml.schemas.jobs import (
    JobCreate,
    JobFinish,
    JobLogRead,
    JobRead,
    LogLines,
    RunReport,
    TrialClaim,
    TrialReport,
    WorkerHello,
    WorkerStatus,
)
from miniml.services import jobs
from miniml.tracking import RUN_STATUS

log = logging.getLogger("miniml.api")
router = APIRouter(prefix="/api/v1/projects/{project}/jobs", tags=["jobs"])


def _read(request: Request, session: Session, job: tables.Job) -> JobRead:
    return jobs.to_read(session, job, mlflow_ui=request.app.state.settings.mlflow_public_url)


async def submit_after_commit(request: Request, job_id: IdPath) -> None:
    """Hand the job to Prefect now; if Prefect is down the submitter loop retries (the job stays queued)."""
    orchestrator = request.app.state.orchestrator
    try:
        await anyio.to_thread.run_sync(orchestrator.submit_pending)
    except Exception as exc:  # Prefect down: readyz says so, and the loop retries
        log.warning("job submission deferred", extra={"job_id": job_id, "error": str(exc)[:200]})


@router.post("", status_code=202)
async def create_job(
    project: str,
    body: JobCreate,
    request: Request,
    response: Response,
    db: DbDep,
    store: StoreDep,
    caller: EngineerDep,
    idempotency_key: Annotated[str | None, Header(max_length=128)] = None,
) -> JobRead:
    """Queue a training job; answers at once (202) with the job id. Replays with the same Idempotency-Key return the first job."""

    def create() -> tuple[JobRead, bool]:
        with db.begin() as session:
            job, created = jobs.create_job(session, store, caller, project, body, idempotency_key=idempotency_key)
            return _read(request, session, job), created

    job, created = await anyio.to_thread.run_sync(create)
    if created:
        await submit_after_commit(request, job.id)
    else:
        response.status_code = 200
    return job


@router.get("")
def list_jobs(
    project: str, request: Request, db: DbDep, caller: ViewerDep, state: JobState | None = None
) -> list[JobRead]:
    """List jobs, newest first (without leaderboards)."""
    with db.begin() as session:
        return [
            jobs.to_read(session, j, leaderboard=False, mlflow_ui=request.app.state.settings.mlflow_public_url)
            for j in jobs.list_jobs(session, caller, project, state=state)
        ]


@router.get("/{job_id}")
def read_job(project: str, job_id: IdPath, request: Request, db: DbDep, caller: ViewerDep) -> JobRead:
    """A job's state, progress, leaderboard, test metrics, MLflow run and registered version."""
    with db.begin() as session:
        return _read(request, session, jobs.read_job(session, caller, project, job_id))


@router.get("/{job_id}/logs")
def read_job_logs(
    project: str, job_id: IdPath, db: DbDep, caller: ViewerDep, after: AfterQuery = 0
) -> list[JobLogRead]:
    """The job's log lines."""
    with db.begin() as session:
        job = jobs.read_job(session, caller, project, job_id)
        return [JobLogRead.model_validate(line) for line in jobs.list_logs(session, job, after=after)]


@router.post("/{job_id}/cancel")
def cancel_job(project: str, job_id: IdPath, request: Request, db: DbDep, caller: EngineerDep) -> JobRead:
    """Cancel: a queued job ends now, a running one's trials are stopped at its worker's next heartbeat."""
    with db.begin() as session:
        return _read(request, session, jobs.cancel_job(session, jobs.read_job(session, caller, project, job_id)))


# Worker reports. The api owns the state; workers (with an engineer key) ask it to move.


@router.post("/{job_id}/start")
def start_job(
    project: str,
    job_id: IdPath,
    body: WorkerHello,
    db: DbDep,
    caller: WorkerDep,
    shard: Annotated[int, Query(ge=0, le=63)] = 0,
) -> WorkerStatus:
    """(worker) Take a queued job; 409 when another worker already has it."""
    with db.begin() as session:
        job = jobs.start_job(session, jobs.read_job(session, caller, project, job_id), body.worker, shard=shard)
        return WorkerStatus(state=JobState(job.state), cancel_requested=job.cancel_requested)


@router.post("/{job_id}/heartbeat")
def heartbeat(project: str, job_id: IdPath, db: DbDep, caller: WorkerDep) -> WorkerStatus:
    """(worker) I am alive; answers whether a cancel was requested."""
    with db.begin() as session:
        job = jobs.heartbeat(session, jobs.read_job(session, caller, project, job_id))
        return WorkerStatus(state=JobState(job.state), cancel_requested=job.cancel_requested)


@router.post("/{job_id}/trials/claim")
def claim_trial(project: str, job_id: IdPath, db: DbDep, caller: WorkerDep) -> TrialClaim:
    """(worker) Reserve one trial of the budget."""
    with db.begin() as session:
        return TrialClaim(granted=jobs.claim_trial(session, jobs.read_job(session, caller, project, job_id)))


@router.post("/{job_id}/trials")
def report_trial(project: str, job_id: IdPath, body: TrialReport, db: DbDep, caller: WorkerDep) -> WorkerStatus:
    """(worker) A trial ended."""
    with db.begin() as session:
        job = jobs.record_trial(session, jobs.read_job(session, caller, project, job_id), body)
        return WorkerStatus(state=JobState(job.state), cancel_requested=job.cancel_requested)


@router.post("/{job_id}/logs", status_code=204)
def append_logs(project: str, job_id: IdPath, body: LogLines, db: DbDep, caller: WorkerDep) -> Response:
    """(worker) Append log lines."""
    with db.begin() as session:
        job = jobs.read_job(session, caller, project, job_id)
        for line in body.lines:
            jobs.log(session, job.id, line, body.level)
    return Response(status_code=204)


@router.post("/{job_id}/run")
def set_run(
    project: str, job_id: IdPath, body: RunReport, request: Request, db: DbDep, registry: RegistryDep, caller: WorkerDep
) -> JobRead:
    """(worker) The job's MLflow parent run: only a run the platform opened for this job, in its project's experiment."""
    with db.begin() as session:
        jobs.read_job(session, caller, project, job_id)  # 404 first: a run id says nothing of another project
    run = registry.run(body.mlflow_run_id)
    jobs.check_run_is_for_job(run, project, job_id)
    with db.begin() as session:
        return _read(
            request, session, jobs.set_run(session, jobs.read_job(session, caller, project, job_id), body.mlflow_run_id)
        )


@router.post("/{job_id}/finalize")
def claim_finalize(project: str, job_id: IdPath, body: WorkerHello, db: DbDep, caller: WorkerDep) -> TrialClaim:
    """(worker) Claim the refit-and-register step; exactly one worker of a job gets it."""
    with db.begin() as session:
        job = jobs.read_job(session, caller, project, job_id)
        return TrialClaim(granted=jobs.claim_finalize(session, job, body.worker))


@router.post("/{job_id}/finish")
def finish_job(
    project: str, job_id: IdPath, body: JobFinish, request: Request, db: DbDep, registry: RegistryDep, caller: WorkerDep
) -> JobRead:
    """(worker) The job ended: succeeded, failed or cancelled."""
    with db.begin() as session:
        job = _read(request, session, jobs.finish_job(session, jobs.read_job(session, caller, project, job_id), body))
    if job.mlflow_run_id:  # the worker ends them first; this catches those it could not (MLflow away)
        registry.end_runs_soon(job.mlflow_run_id, RUN_STATUS[job.state.value])
    return job
