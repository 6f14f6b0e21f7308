from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import ConfigDict, Field

from miniml.domain.roles import Role
from miniml.schemas.common import SLUG_PATTERN, ReadModel, StrictModel


class KeyCreate(StrictModel):
    role: Role
    projects: list[Annotated[str, Field(json_schema_extra={"pattern": SLUG_PATTERN})]] = Field(
        default_factory=list,
        description="Projects the key may touch: one or more for viewer and engineer, none for admin and the "
        "service roles (they reach every project).",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"role": {"enum": ["viewer", "engineer"]}}},
            "then": {"required": ["projects"], "properties": {"projects": {"minItems": 1}}},
            "else": {"properties": {"projects": {"maxItems": 0}}},
        },
    )
    name: str = Field(default="", max_length=128, description="A label to recognise the key by.")
    expires_in_days: float | None = Field(default=None, gt=0, le=3650, description="Unset: never expires.")


class KeyGrants(StrictModel):
    projects: list[Annotated[str, Field(json_schema_extra={"pattern": SLUG_PATTERN})]] = Field(
        min_length=1,
        max_length=1000,
        description="Every project the key may touch from now on (it replaces the grants).",
    )


class KeyRead(ReadModel):
    id: str
    name: str
    role: Role
    projects: list[str]
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(KeyRead):
    key: str = Field(description="The secret key. Shown once: it is stored only as a hash.")


class TokenRequest(StrictModel):
    api_key: str | None = Field(default=None, description="Or send it as the X-API-Key header.")


class TokenRead(ReadModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105  (the OAuth2 token type, not a secret)
    expires_in: int
