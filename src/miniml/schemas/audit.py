from __future__ import annotations

from datetime import datetime

from miniml.schemas.common import ReadModel


class AuditEventRead(ReadModel):
    id: int
    at: datetime
    key_id: str | None
    action: str
    project: str | None
    target: str
    status: int
    request_id: str
    detail: str | None = None
