from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

from miniml.schemas.deployments import DeploymentCreate, DeploymentEventRead, DeploymentRead, DeploymentUpdate
from miniml.schemas.monitoring import (
    DriftContext,
    DriftReportRead,
    DriftReports,
    DriftResult,
    EvaluationContext,
    EvaluationResult,
    MonitoringRead,
    QualityRead,
    RetrainingRead,
)
from miniml.sdk.bodies import request_body

if TYPE_CHECKING:
    from miniml.sdk.client import Client


class Deployments:
    def __init__(self, client: Client) -> None:
        self._c = client

    def _url(self, project: str, *parts: str) -> str:
        return "/".join([f"/api/v1/projects/{project}/deployments", *parts])

    def create(
        self,
        project: str,
        name: str,
        model_name: str,
        *,
        target: str | int | None = None,
        traffic: builtins.list[dict[str, int]] | None = None,
    ) -> DeploymentRead:
        """Serve a model by alias or version, or split traffic between versions.

        Raises:
            Conflict: the name is taken.
            InvalidInput: unknown model, alias or version; weights not summing to 100.
        """
        body = request_body(
            DeploymentCreate, {"name": name, "model_name": model_name, "target": target, "traffic": traffic}
        )
        return DeploymentRead.model_validate(
            self._c.request("POST", self._url(project), json=body.model_dump(exclude_none=True)).json()
        )

    def list(self, project: str) -> builtins.list[DeploymentRead]:
        """A project's deployments."""
        return [DeploymentRead.model_validate(d) for d in self._c.request("GET", self._url(project)).json()]

    def get(self, project: str, name: str) -> DeploymentRead:
        """Desired target, what each replica serves, readiness."""
        return DeploymentRead.model_validate(self._c.request("GET", self._url(project, name)).json())

    def wait_ready(self, project: str, name: str, *, timeout_s: float = 120) -> DeploymentRead:
        """Poll until every live inference replica serves the desired versions.

        Raises:
            TimeoutError: not ready in time (the deployment's ``error`` says why, if a load failed).
        """
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            dep = self.get(project, name)
            if dep.ready:
                return dep
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"deployment {name!r} not ready within {timeout_s:.0f}s: {dep.error or dep.replicas}"
                )
            time.sleep(0.5)

    def status(self, project: str, name: str) -> DeploymentRead:
        """Alias of ``get``."""
        return self.get(project, name)

    def update(
        self,
        project: str,
        name: str,
        *,
        target: str | int | None = None,
        traffic: builtins.list[dict[str, int]] | None = None,
    ) -> DeploymentRead:
        """Point a deployment at a new target (no downtime)."""
        body = request_body(DeploymentUpdate, {"target": target, "traffic": traffic}).model_dump(exclude_none=True)
        return DeploymentRead.model_validate(self._c.request("PATCH", self._url(project, name), json=body).json())

    def rollback(self, project: str, name: str) -> DeploymentRead:
        """Back to the previous target.

        Raises:
            Conflict: there is no previous target.
        """
        return DeploymentRead.model_validate(self._c.request("POST", self._url(project, name, "rollback")).json())

    def history(self, project: str, name: str) -> builtins.list[DeploymentEventRead]:
        return [
            DeploymentEventRead.model_validate(e)
            for e in self._c.request("GET", self._url(project, name, "history")).json()
        ]

    def delete(self, project: str, name: str) -> None:
        self._c.request("DELETE", self._url(project, name))

    # Monitoring: drift, quality, retraining

    def monitoring(self, project: str, name: str) -> MonitoringRead:
        """The drift schedule and window, and the retraining policy."""
        return MonitoringRead.model_validate(self._c.request("GET", self._url(project, name, "monitoring")).json())

    def set_monitoring(
        self,
        project: str,
        name: str,
        *,
        drift_interval_s: int | None = None,
        drift_window_s: int | None = None,
        retrain: dict[str, Any] | bool | None = False,
    ) -> MonitoringRead:
        """Change the drift schedule or window; ``retrain`` sets the policy (None removes it, False leaves it).

        Raises:
            InvalidInput: a bad cron expression, a threshold ≤ 0, or a policy on a traffic split.
        """
        body: dict[str, Any] = {"drift_interval_s": drift_interval_s, "drift_window_s": drift_window_s}
        body = {k: v for k, v in body.items() if v is not None}
        if retrain is not False:
            body["retrain"] = retrain
        return MonitoringRead.model_validate(
            self._c.request("PUT", self._url(project, name, "monitoring"), json=body).json()
        )

    def check_drift(self, project: str, name: str) -> DriftReportRead:
        """Start a drift check now; the report fills in when a worker has run it (see ``drift``).

        Raises:
            Conflict: a check of this deployment is still running.
            InvalidInput: the served version was not trained here (no reference profile).
        """
        return DriftReportRead.model_validate(
            self._c.request("POST", self._url(project, name, "drift", "check")).json()
        )

    def drift(self, project: str, name: str, *, limit: int = 50) -> DriftReports:
        """The latest finished drift report and the history."""
        response = self._c.request("GET", self._url(project, name, "drift"), params={"limit": limit})
        return DriftReports.model_validate(response.json())

    def wait_drift(self, project: str, name: str, report_id: int, *, timeout_s: float = 300) -> DriftReportRead:
        """Poll until a drift check has finished (done, no_data or failed)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            found = next((r for r in self.drift(project, name).history if r.id == report_id), None)
            if found is not None and found.state not in ("queued", "running"):
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"drift check {report_id} did not finish within {timeout_s:.0f}s")
            time.sleep(1)

    def quality(self, project: str, name: str, *, window_s: int = 3600) -> QualityRead:
        """Live accuracy/F1 or RMSE/MAE from the feedback of the last ``window_s`` seconds."""
        response = self._c.request("GET", self._url(project, name, "quality"), params={"window_s": window_s})
        return QualityRead.model_validate(response.json())

    def retrain(self, project: str, name: str) -> RetrainingRead:
        """Retrain now: a challenger is trained, scored against the champion, and promoted only if better.

        Raises:
            Conflict: a retraining of this deployment is still running.
        """
        return RetrainingRead.model_validate(self._c.request("POST", self._url(project, name, "retrain")).json())

    def retrainings(self, project: str, name: str, *, limit: int = 50) -> builtins.list[RetrainingRead]:
        """Every retraining, newest first, with its decision and why."""
        response = self._c.request("GET", self._url(project, name, "retrainings"), params={"limit": limit})
        return [RetrainingRead.model_validate(r) for r in response.json()]


class MonitorReports:
    """What a worker tells the api about drift checks and evaluations it runs (engineer or admin key)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def _url(self, project: str, name: str, *parts: str) -> str:
        return "/".join([f"/api/v1/projects/{project}/deployments/{name}", *parts])

    def drift_context(self, project: str, name: str, report_id: int) -> DriftContext:
        url = self._url(project, name, "drift", str(report_id), "context")
        return DriftContext.model_validate(self._c.request("GET", url).json())

    def drift_result(self, project: str, name: str, report_id: int, result: DriftResult) -> DriftReportRead:
        url = self._url(project, name, "drift", str(report_id), "result")
        return DriftReportRead.model_validate(self._c.request("POST", url, json=result.model_dump()).json())

    def evaluation_context(self, project: str, name: str, retraining_id: int) -> EvaluationContext:
        url = self._url(project, name, "retrainings", str(retraining_id), "context")
        return EvaluationContext.model_validate(self._c.request("GET", url).json())

    def evaluation_result(
        self, project: str, name: str, retraining_id: int, result: EvaluationResult
    ) -> RetrainingRead:
        url = self._url(project, name, "retrainings", str(retraining_id), "result")
        return RetrainingRead.model_validate(self._c.request("POST", url, json=result.model_dump()).json())


def predict(
    client: Client,
    inference_url: str,
    endpoint: str,
    rows: builtins.list[dict[str, Any]],
    *,
    probabilities: bool = False,
) -> dict[str, Any]:
    """POST rows to an endpoint of the inference service; returns its JSON."""
    params = {"probabilities": "true"} if probabilities else {}
    response = client.http.post(
        f"{inference_url.rstrip('/')}/v1/endpoints/{endpoint}/predict",
        json={"rows": rows},
        params=params,
        headers=client.headers,
    )
    from miniml.sdk.client import raise_for_problem

    raise_for_problem(response)
    result: dict[str, Any] = response.json()
    return result
