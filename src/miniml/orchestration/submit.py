"""Submitting jobs to Prefect from the api, idempotently: a job is never lost or run twice.

The api speaks to Prefect's REST API with httpx (two calls: read a deployment by name, create a
flow run from it). The Prefect package itself stays out of the api process: importing its client
costs ~31 MB and about a second, and the api needs none of the rest of it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from miniml.config import Settings
from miniml.db import tables
from miniml.errors import MiniMLError, UpstreamUnavailable
from miniml.orchestration import DEPLOYMENT, DRIFT_DEPLOYMENT, EVALUATE_DEPLOYMENT
from miniml.orchestration.kubernetes import job_variables
from miniml.services import jobs, monitoring
from miniml.tracking.registry import Registry

log = logging.getLogger("miniml.orchestration")
Table = type[tables.DriftReport] | type[tables.Retraining]


class DeploymentMissing(Exception):
    """Prefect has no deployment of that name: no worker has registered it yet."""


class Orchestrator:
    def __init__(self, settings: Settings, db: sessionmaker[Session]) -> None:
        self.settings = settings
        self.db = db
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        # The request that queued a job and the api's loop both submit: one at a time in this process.
        self._submitting = threading.Lock()

    def _prefect(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(base_url=self.settings.prefect_api_url.rstrip("/") + "/", timeout=10)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _deployment(self, deployment: str) -> dict[str, Any]:
        flow, name = deployment.split("/", 1)
        answer = self._prefect().get(f"deployments/name/{flow}/{name}")
        if answer.status_code == 404:
            raise DeploymentMissing(f"Prefect has no deployment {deployment}; start `miniml worker`")
        answer.raise_for_status()
        found: dict[str, Any] = answer.json()
        return found

    def _run(
        self,
        deployment: str,
        name: str,
        parameters: dict[str, Any],
        project: str,
        created: float,
        job_variables: dict[str, Any] | None = None,
    ) -> str:
        """A flow run of ``deployment``, scheduled now (Prefect's default for a run without a state)."""
        target = self._deployment(deployment)
        body: dict[str, Any] = {
            "name": name,
            "parameters": parameters,
            # The same key twice gives the same flow run: a retried submission never doubles a job.
            # The creation time tells apart jobs of two platforms (or a reset DB) on one Prefect.
            "idempotency_key": f"miniml-{name}-{created:.6f}",
            "tags": ["miniml", f"project:{project}"],
        }
        if job_variables:  # a Kubernetes work pool makes them the Job's resources; a process worker ignores them
            body["job_variables"] = job_variables
        answer = self._prefect().post(f"deployments/{target['id']}/create_flow_run", json=body)
        answer.raise_for_status()
        return str(answer.json()["id"])

    def _run_deployment(
        self, job_id: int, project: str, shard: int, created: float, resources: dict[str, Any] | None
    ) -> str:
        name = f"job-{job_id}" if shard == 0 else f"job-{job_id}-shard-{shard}"
        params = {"job_id": job_id, "project": project, "shard": shard, "created": created}
        variables = job_variables(resources, gpu_image=self.settings.jobs.gpu_image)
        return self._run(DEPLOYMENT, name, params, project, created, variables)

    def submit_pending(self) -> list[int]:
        """Submit every queued job that has no flow run yet; return the ids submitted."""
        with self._submitting:
            return self._submit_pending()

    def _submit_pending(self) -> list[int]:
        with self.db.begin() as session:
            pending = [
                (
                    j.id,
                    j.project.name,
                    int(j.spec.get("parallelism", 1)),
                    j.created_at.timestamp(),
                    j.spec.get("resources"),
                )
                for j in jobs.unsubmitted_jobs(session)
            ]
        done = []
        for job_id, project, parallelism, created, resources in pending:
            try:
                run_ids = [
                    self._run_deployment(job_id, project, shard, created, resources) for shard in range(parallelism)
                ]
            except Exception as exc:
                raise UpstreamUnavailable(f"Prefect did not take job {job_id}: {type(exc).__name__}: {exc}") from exc
            with self.db.begin() as session:
                jobs.mark_submitted(session, job_id, run_ids[0])
            done.append(job_id)
        return done

    def supervise_monitoring(self, registry: Registry) -> None:
        """Start due drift checks and scheduled retrainings, move retrainings on, submit their flows.

        MLflow and Prefect are asked outside any transaction, and each check or retraining is
        recorded in its own short one: on SQLite a write holds the whole DB, and every other
        writer waits at most db.connect_timeout_s for it."""
        with self.db.begin() as session:
            due = [
                (kind, d.id, d.name, d.project.name, d.model_name, dict(d.target))
                for kind, deps in (
                    ("drift", monitoring.due_drift_checks(session)),
                    ("retrain", monitoring.due_retrainings(session)),
                )
                for d in deps
            ]
        for kind, dep_id, name, project, model_name, served in due:
            asked = monitoring.ask_champion(registry, project, model_name, served)
            try:
                with self.db.begin() as session:
                    dep = session.get(tables.Deployment, dep_id)
                    if dep is None or dep.target != served:  # deleted or moved meanwhile: the next tick looks again
                        continue
                    if kind == "drift":
                        report = monitoring.create_drift_check(session, registry, dep, trigger="schedule", asked=asked)
                        log.info("drift check queued", extra={"deployment": name, "report": report.id})
                    else:
                        monitoring.create_retraining(session, registry, dep, trigger="schedule", asked=asked)
            except MiniMLError as exc:
                log.warning(
                    "scheduled check not started", extra={"deployment": name, "kind": kind, "error": exc.detail}
                )
        with self.db.begin() as session:
            monitoring.advance_retrainings(session)
        with self.db.begin() as session:
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
        try:
            deployment = self._deployment(DEPLOYMENT)
        except Exception as exc:
            return False, f"no worker has registered {DEPLOYMENT} ({type(exc).__name__}); start `miniml worker`"
        status = str(deployment.get("status") or "").lower()
        if "not_ready" in status:
            return False, f"no worker is polling {DEPLOYMENT}; start `miniml worker` (jobs wait queued meanwhile)"
        return True, f"{DEPLOYMENT} is served"
