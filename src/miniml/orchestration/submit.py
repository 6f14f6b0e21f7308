"""Submitting jobs to Prefect from the api, idempotently: a job is never lost or run twice."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from miniml.config import Settings
from miniml.errors import UpstreamUnavailable
from miniml.orchestration import DEPLOYMENT
from miniml.services import jobs

log = logging.getLogger("miniml.orchestration")


class Orchestrator:
    def __init__(self, settings: Settings, db: sessionmaker[Session]) -> None:
        self.settings = settings
        self.db = db

    def _prefect(self) -> Any:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.settings.prefect_api_url})

    def _run_deployment(self, job_id: int, project: str, shard: int, created: float) -> str:
        from prefect.deployments import run_deployment

        name = f"job-{job_id}" if shard == 0 else f"job-{job_id}-shard-{shard}"
        with self._prefect():
            run = run_deployment(
                name=DEPLOYMENT,
                parameters={"job_id": job_id, "project": project, "shard": shard},
                flow_run_name=name,
                timeout=0,
                # The same key twice gives the same flow run: a retried submission never doubles a job.
                # The creation time tells apart jobs of two platforms (or a reset DB) on one Prefect.
                idempotency_key=f"miniml-{name}-{created:.6f}",
                tags=["miniml", f"project:{project}"],
            )
        return str(run.id)  # type: ignore[union-attr]  # sync call outside an event loop

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
