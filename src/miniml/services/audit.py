"""The audit log: who (key id) did what to which object, when, and how it ended."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from miniml.db import tables


def create_event(
    session: Session,
    *,
    key_id: str | None,
    action: str,
    project: str | None,
    target: str,
    status: int,
    request_id: str,
    detail: str | None = None,
) -> None:
    session.add(
        tables.AuditEvent(
            key_id=key_id,
            action=action[:200],
            project=project,
            target=target[:500],
            status=status,
            request_id=request_id,
            detail=detail[:2000] if detail else None,
        )
    )


def list_events(
    session: Session,
    *,
    project: str | None = None,
    key_id: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[tables.AuditEvent]:
    query = select(tables.AuditEvent).order_by(tables.AuditEvent.id.desc()).limit(limit)
    if project:
        query = query.where(tables.AuditEvent.project == project)
    if key_id:
        query = query.where(tables.AuditEvent.key_id == key_id)
    if since:
        query = query.where(tables.AuditEvent.at >= since)
    return list(session.scalars(query))
