"""Roles: three for people, nested, and two for the platform's own services.

People: an admin may do all an engineer may, an engineer all a viewer may. Services: ``worker``
(training, batch and monitoring flows) reads and writes like an engineer in every project and is
the only caller of the job-lifecycle and result routes; ``inference`` only reads the desired
deployments and reports what it serves. No person's key reaches a service-only route, not even
an admin's: a leaked user key cannot pose as a worker.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    viewer = "viewer"
    engineer = "engineer"
    admin = "admin"
    worker = "worker"
    inference = "inference"

    @property
    def is_service(self) -> bool:
        return self in _SERVICE_GRANTS

    def allows(self, needed: Role) -> bool:
        if self.is_service:
            return needed in _SERVICE_GRANTS[self]
        if needed.is_service:
            return False
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.viewer: 0, Role.engineer: 1, Role.admin: 2}
# What each service role may do besides its own routes.
_SERVICE_GRANTS = {
    Role.worker: frozenset({Role.worker, Role.engineer, Role.viewer}),
    Role.inference: frozenset({Role.inference}),
}
