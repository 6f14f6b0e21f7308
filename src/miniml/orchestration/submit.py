"""Submitting jobs to Prefect from the api, idempotently: a job is never lost or run twice."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from miniml.config import Settings
from miniml.db import tables
from miniml.errors import MiniMLError, UpstreamUnavailable
from miniml.orchestration import DEPLOYMENT, DRIFT_DEPLOYMENT, EVALUATE_DEPLOYMENT
from miniml.services import jobs, monitoring
from miniml.tracking.registry import Registry

log = logging.getLogger("miniml.orchestration")
Table = type[tables.DriftReport] | type[tables.Retraining]


class Orchestrator:
    def __init__(self, settings: Settings, db: sessionmaker[Session]) -> None:
        self.settings = settings
        self.db = db

    def _prefect(self) -> Any:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.settings.prefect_api_url})

    def _run(self, deployment: str, name: str, parameters: dict[str, Any], project: str, created: float) -> str:
        from prefect.deployments import run_deployment

        with self._prefect():
            run = run_deployment(
                name=deployment,
                parameters=parameters,
                flow_run_name=name,
                timeout=0,
                # The same key twice gives the same flow run: a retried submission never doubles a job.
                # The creation time tells apart jobs of two platforms (or a reset DB) on one Prefect.
                idempotency_key=f"miniml-{name}-{created:.6f}",
                tags=["miniml", f"project:{project}"],
            )
        return str(run.id)  # type: ignore[union-attr]  # sync call outside an event loop

    def _run_deployment(self, job_id: int, project: str, shard: int, created: float) -> str:
        name = f"job-{job_id}" if shard == 0 else f"job-{job_id}-shard-{shard}"
        params = {"job_id": job_id, "project": project, "shard": shard, "created": created}
        return self._run(DEPLOYMENT, name, params, project, created)

    def submit_pending(self) -> list[int]:
        """Submit every queued job that has no flow run yet; return the ids submitted."""
        with self.db.begin() as session:
            pending = [
                (j.id, j.project.name, int(j.spec.get("parallelism", 1)), j.created_at.timestamp())
                for j in jobs.unsubmitted_jobs(session)
            ]
        done = []
        for job_id, project, parallelism, created in pending:
            try:
                run_ids = [self._run_deployment(job_id, project, shard, created) for shard in range(parallelism)]
            except Exception as exc:
                raise UpstreamUnavailable(f"Prefect did not take job {job_id}: {type(exc).__name__}: {exc}") from exc
            with self.db.begin() as session:
                jobs.mark_submitted(session, job_id, run_ids[0])
            done.append(job_id)
        return done

    def supervise_monitoring(self, registry: Registry) -> None:
        """Start due drift checks and scheduled retrainings, move retrainings on, submit their flows."""
        with self.db.begin() as session:
            for dep in monitoring.due_drift_checks(session):
                report = monitoring.create_drift_check(session, registry, dep, trigger="schedule")
                log.info("drift check queued", extra={"deployment": dep.name, "report": report.id})
            for dep in monitoring.due_retrainings(session):
                try:
                    with session.begin_nested():
                        monitoring.create_retraining(session, registry, dep, trigger="schedule")
                except MiniMLError as exc:
                    log.warning("scheduled retraining not started", extra={"deployment": dep.name, "error": exc.detail})
            monitoring.advance_retrainings(session)
            # Each: its table, the Prefect deployment, the flow run's name prefix and id parameter.
            kinds: list[tuple[Table, str, str, str, list[Any]]] = [
                (tables.DriftReport, DRIFT_DEPLOYMENT, "drift", "report_id", monitoring.unsubmitted_drift(session)),
                (
                    tables.Retraining,
                    EVALUATE_DEPLOYMENT,
                    "evaluate",
                    "retraining_id",
                    monitoring.unsubmitted_evaluations(session),
                ),
            ]
            projects = {p.id: p.name for p in session.scalars(select(tables.Project))}
            work = [
                (
                    table,
                    target,
                    f"{prefix}-{r.deployment}-{r.id}",
                    {key: r.id, "project": projects[r.project_id], "deployment": r.deployment},
                    r.id,
                    r.created_at.timestamp(),
                )
                for table, target, prefix, key, rows in kinds
                for r in rows
            ]
        for table, target, name, params, rid, created in work:
            try:
                run = self._run(target, name, params, params["project"], created)
            except Exception as exc:
                raise UpstreamUnavailable(f"Prefect did not take {name}: {type(exc).__name__}: {exc}") from exc
            with self.db.begin() as session:
                row = session.get(table, rid)
                if isinstance(row, tables.DriftReport | tables.Retraining):
                    row.flow_run_id = run

    def worker_status(self) -> tuple[bool, str]:
        """Is a worker serving the training deployment? (Prefect marks it ready while one polls.)"""
        from prefect.client.orchestration import get_client

        try:
            with self._prefect(), get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(DEPLOYMENT)
        except Exception as exc:
            return False, f"no worker has registered {DEPLOYMENT} ({type(exc).__name__}); start `miniml worker`"
        status = str(getattr(deployment, "status", "") or "").lower()
        if "not_ready" in status:
            return False, f"no worker is polling {DEPLOYMENT}; start `miniml worker` (jobs wait queued meanwhile)"
        return True, f"{DEPLOYMENT} is served"
