from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from miniml.api.deps import AdminDep, DbDep
from miniml.schemas.audit import AuditEventRead
from miniml.services import audit

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])


@router.get("")
def list_audit_events(
    db: DbDep,
    caller: AdminDep,
    project: str | None = None,
    key_id: str | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventRead]:
    """Every mutating call, newest first: who, what, which object, when, result."""
    with db.begin() as session:
        events = audit.list_events(session, project=project, key_id=key_id, since=since, limit=limit)
        return [AuditEventRead.model_validate(e) for e in events]
