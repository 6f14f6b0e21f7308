from __future__ import annotations

import builtins
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from miniml.domain.jobs import JobState
from miniml.schemas.jobs import (
    JobCreate,
    JobFinish,
    JobLogRead,
    JobRead,
    TrialClaim,
    TrialReport,
    WorkerStatus,
)
from miniml.sdk.bodies import request_body

if TYPE_CHECKING:
    from miniml.sdk.client import Client


class Jobs:
    def __init__(self, client: Client) -> None:
        self._c = client

    def _url(self, project: str, *parts: str | int) -> str:
        return "/".join([f"/api/v1/projects/{project}/jobs", *map(str, parts)])

    def create(self, project: str, *, idempotency_key: str | None = None, **spec: Any) -> JobRead:
        """Queue a training job (answers at once); see JobCreate for the fields.

        Raises:
            InvalidInput: unknown dataset, target, family or metric; too few rows; a budget of nothing.
        """
        body = request_body(JobCreate, spec).model_dump(exclude_unset=True)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobRead.model_validate(self._c.request("POST", self._url(project), json=body, headers=headers).json())

    def get(self, project: str, job_id: int) -> JobRead:
        """A job with its progress and leaderboard."""
        return JobRead.model_validate(self._c.request("GET", self._url(project, job_id)).json())

    def list(self, project: str, *, state: JobState | str | None = None) -> builtins.list[JobRead]:
        """A project's jobs, newest first."""
        params = {"state": str(state)} if state else {}
        return [JobRead.model_validate(j) for j in self._c.request("GET", self._url(project), params=params).json()]

    def logs(self, project: str, job_id: int, *, after: int = 0) -> builtins.list[JobLogRead]:
        """The job's log lines."""
        rows = self._c.request("GET", self._url(project, job_id, "logs"), params={"after": after}).json()
        return [JobLogRead.model_validate(r) for r in rows]

    def cancel(self, project: str, job_id: int) -> JobRead:
        """Cancel a job (a running one's trials are stopped within its worker's heartbeat, mid-fit if need be).

        Raises:
            Conflict: the job already ended.
        """
        return JobRead.model_validate(self._c.request("POST", self._url(project, job_id, "cancel")).json())

    def wait(
        self,
        project: str,
        job_id: int,
        *,
        timeout_s: float = 3600,
        poll_s: float = 1.0,
        progress: Callable[[JobRead], None] | None = None,
    ) -> JobRead:
        """Poll until the job ends; ``progress`` sees every state read on the way.

        Raises:
            TimeoutError: still not finished after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get(project, job_id)
            if progress:
                progress(job)
            if job.state.terminal:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.state.value} after {timeout_s:.0f}s")
            time.sleep(poll_s)


class JobReports:
    """What a worker tells the api about a job it runs (needs an engineer or admin key)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def _url(self, project: str, job_id: int, *parts: str) -> str:
        return "/".join([f"/api/v1/projects/{project}/jobs/{job_id}", *parts])

    def start(self, project: str, job_id: int, worker: str, *, shard: int = 0) -> WorkerStatus:
        url = self._url(project, job_id, "start")
        return WorkerStatus.model_validate(
            self._c.request("POST", url, json={"worker": worker}, params={"shard": shard}).json()
        )

    def heartbeat(self, project: str, job_id: int) -> WorkerStatus:
        return WorkerStatus.model_validate(self._c.request("POST", self._url(project, job_id, "heartbeat")).json())

    def claim_trial(self, project: str, job_id: int) -> bool:
        return TrialClaim.model_validate(
            self._c.request("POST", self._url(project, job_id, "trials", "claim")).json()
        ).granted

    def trial(self, project: str, job_id: int, report: TrialReport) -> WorkerStatus:
        body = report.model_dump()
        return WorkerStatus.model_validate(
            self._c.request("POST", self._url(project, job_id, "trials"), json=body).json()
        )

    def log(self, project: str, job_id: int, *lines: str, level: str = "info") -> None:
        self._c.request("POST", self._url(project, job_id, "logs"), json={"lines": list(lines), "level": level})

    def set_run(self, project: str, job_id: int, run_id: str) -> JobRead:
        return JobRead.model_validate(
            self._c.request("POST", self._url(project, job_id, "run"), json={"mlflow_run_id": run_id}).json()
        )

    def finalize(self, project: str, job_id: int, worker: str) -> bool:
        url = self._url(project, job_id, "finalize")
        return TrialClaim.model_validate(self._c.request("POST", url, json={"worker": worker}).json()).granted

    def finish(self, project: str, job_id: int, body: JobFinish) -> JobRead:
        url = self._url(project, job_id, "finish")
        return JobRead.model_validate(self._c.request("POST", url, json=body.model_dump()).json())
