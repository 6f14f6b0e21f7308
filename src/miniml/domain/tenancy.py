"""Who is calling, and which projects they may see.

A key that is not admin is granted a set of projects. Every other project, and every object in
it, is invisible to that key: requests for them answer 404 exactly as for objects that do not
exist, so a key cannot even learn another tenant's names.
"""

from __future__ import annotations

from dataclasses import dataclass

from miniml.domain.roles import Role
from miniml.errors import Forbidden, NotFound


@dataclass(frozen=True, slots=True)
class Caller:
    key_id: str
    role: Role
    # None: every project (admin and service keys).
    projects: frozenset[str] | None

    def can_see(self, project: str) -> bool:
        return self.projects is None or project in self.projects

    def require_role(self, needed: Role) -> None:
        if not self.role.allows(needed):
            if needed.is_service:
                raise Forbidden(
                    f"This call is for the platform's {needed.value} service only; key {self.key_id} is "
                    f"{self.role.value}. Workers and inference replicas use their own service keys."
                )
            if self.role.is_service:
                raise Forbidden(
                    f"This call needs the {needed.value} role; key {self.key_id} is the {self.role.value} "
                    "service's key, which may not make it. Use a person's key."
                )
            raise Forbidden(
                f"This call needs the {needed.value} role or higher; key {self.key_id} is {self.role.value}. "
                "Ask an admin for a key with that role."
            )

    def require_project(self, project: str) -> None:
        if not self.can_see(project):
            raise NotFound(f"Project {project!r} does not exist.")
