from __future__ import annotations

from typing import TYPE_CHECKING

from miniml.schemas.projects import ProjectCreate, ProjectRead
from miniml.sdk.bodies import request_body

if TYPE_CHECKING:
    from miniml.sdk.client import Client


class Projects:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str, *, description: str = "") -> ProjectRead:
        """Create a project.

        Raises:
            InvalidInput: the name is not a slug.
            Conflict: the name is taken.
        """
        body = request_body(ProjectCreate, {"name": name, "description": description}).model_dump()
        return ProjectRead.model_validate(self._c.request("POST", "/api/v1/projects", json=body).json())

    def list(self) -> list[ProjectRead]:
        """List the projects this key may see."""
        return [ProjectRead.model_validate(p) for p in self._c.request("GET", "/api/v1/projects").json()]

    def get(self, name: str) -> ProjectRead:
        """Get one project.

        Raises:
            NotFound: no such project, or not granted to this key.
        """
        return ProjectRead.model_validate(self._c.request("GET", f"/api/v1/projects/{name}").json())

    def delete(self, name: str) -> None:
        """Delete a project and everything in it."""
        self._c.request("DELETE", f"/api/v1/projects/{name}")
