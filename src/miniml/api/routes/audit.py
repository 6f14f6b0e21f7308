from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from miniml.api.deps import AdminDep, DbDep
from miniml.errors import InvalidInput
from miniml.schemas.audit import AuditEventRead
from miniml.services import audit

router = APIRouter(prefix="/api/v1/audit", tags=["audit"])

# A date or an RFC 3339 date-time; a bare number (a Unix time?) is refused.
_DATE_PREFIX = r"^\d{4}-\d{2}-\d{2}"
_WHEN: dict[str, Any] = {
    "type": "string",
    "pattern": _DATE_PREFIX,
    "maxLength": 40,
    "anyOf": [{"format": "date"}, {"format": "date-time"}],
}


def _parse_since(value: str) -> datetime:
    from pydantic import TypeAdapter, ValidationError

    try:
        parsed = TypeAdapter(datetime).validate_python(value)
    except ValidationError:
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
            pattern=_DATE_PREFIX,
            max_length=40,
            json_schema_extra=_WHEN,
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
