from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

from miniml.schemas.deployments import DeploymentCreate, DeploymentEventRead, DeploymentRead, DeploymentUpdate

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
        body = DeploymentCreate.model_validate(
            {"name": name, "model_name": model_name, "target": target, "traffic": traffic}
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
        body = DeploymentUpdate.model_validate({"target": target, "traffic": traffic}).model_dump(exclude_none=True)
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
