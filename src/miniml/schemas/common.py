"""Shapes shared by every resource."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from miniml.domain.limits import MAX_ID

VersionField = Annotated[int, Field(ge=1, le=MAX_ID)]


class StrictModel(BaseModel):
    """Request bodies forbid unknown fields: a stray ``role`` or ``owner`` can never slip through."""

    model_config = ConfigDict(extra="forbid")


class ReadModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    request_id: str | None = None
    instance: str | None = None
