from __future__ import annotations

import builtins
from typing import TYPE_CHECKING

from miniml.schemas.models import ModelComparison, ModelRead, ModelVersionRead

if TYPE_CHECKING:
    from miniml.sdk.client import Client


class Models:
    def __init__(self, client: Client) -> None:
        self._c = client

    def _url(self, project: str, *parts: str | int) -> str:
        return "/".join([f"/api/v1/projects/{project}/models", *map(str, parts)])

    def list(self, project: str) -> builtins.list[ModelRead]:
        """Registered models of a project."""
        return [ModelRead.model_validate(m) for m in self._c.request("GET", self._url(project)).json()]

    def get(self, project: str, model: str) -> ModelRead:
        """One model with its aliases."""
        return ModelRead.model_validate(self._c.request("GET", self._url(project, model)).json())

    def versions(self, project: str, model: str) -> builtins.list[ModelVersionRead]:
        """Versions with metrics, aliases and lineage."""
        rows = self._c.request("GET", self._url(project, model, "versions")).json()
        return [ModelVersionRead.model_validate(v) for v in rows]

    def compare(self, project: str, model: str, a: int | str, b: int | str) -> ModelComparison:
        """Two versions side by side."""
        url = self._url(project, model, "compare")
        return ModelComparison.model_validate(self._c.request("GET", url, params={"a": a, "b": b}).json())

    def approval(self, project: str, model: str, version: int | str, action: str, note: str) -> ModelVersionRead:
        """Production approval: ``action`` request (engineer), approve or reject (admin), with a note.

        Raises:
            Forbidden: approve and reject need an admin key.
            Conflict: a request while one is pending.
        """
        url = self._url(project, model, "versions", version, "approval")
        answer = self._c.request("POST", url, json={"action": action, "note": note})
        return ModelVersionRead.model_validate(answer.json())

    def promote(self, project: str, model: str, version: int | str, stage: str) -> ModelVersionRead:
        """Move the staging or production alias to a version.

        Raises:
            Forbidden: production needs an admin key.
            NotFound: no such model or version.
        """
        url = self._url(project, model, "versions", version, "promote")
        return ModelVersionRead.model_validate(self._c.request("POST", url, json={"stage": stage}).json())
