from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from miniml.api.deps import AdminDep, DbDep
from miniml.errors import InvalidInput
from miniml.schemas.audit import AuditEventRead
from miniml.services import audit

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

# A date, or a date and time with an optional offset: a bare number (a Unix time?) is refused.
_ISO_8601 = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})?)?$"


def _parse_since(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"since={value!r} is not a date; send ISO 8601, e.g. 2026-12-01T09:00:00Z.") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get("")
def list_audit_events(
    db: DbDep,
    caller: AdminDep,
    project: Annotated[str | None, Query(max_length=63)] = None,
    key_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[
        str | None,
        Query(
            pattern=_ISO_8601,
            max_length=40,
            description="Only events at or after this ISO 8601 date or time, e.g. 2026-12-01 or 2026-12-01T09:00:00Z.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditEventRead]:
    """Every mutating call, newest first: who, what, which object, when, result."""
    with db.begin() as session:
        after = _parse_since(since) if since else None
        events = audit.list_events(session, project=project, key_id=key_id, since=after, limit=limit)
        return [AuditEventRead.model_validate(e) for e in events]
