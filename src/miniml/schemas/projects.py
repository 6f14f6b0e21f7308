from __future__ import annotations

from datetime import datetime

from pydantic import Field

from miniml.schemas.common import ReadModel, StrictModel, slug_field


class ProjectCreate(StrictModel):
    name: str = slug_field("Slug: 1-63 lowercase letters, digits and dashes.")
    description: str = Field(default="", max_length=2000)


class ProjectRead(ReadModel):
    name: str
    description: str
    created_at: datetime
    created_by: str | None
