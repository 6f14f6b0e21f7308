"""Shapes shared by every resource."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from miniml.domain.limits import MAX_ID

VersionField = Annotated[int, Field(ge=1, le=MAX_ID)]

# Name rules, declared in the schema so clients and fuzzers know them; the services check them
# with messages that say how to fix a name (pydantic's own would only say "should match pattern").
SLUG_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
STAGE_WORDS: list[JsonValue] = ["staging", "production", "Staging", "Production"]


def slug_field(description: str, **kwargs: Any) -> Any:
    return Field(description=description, json_schema_extra={"pattern": SLUG_PATTERN}, **kwargs)


def name_field(description: str, **kwargs: Any) -> Any:
    return Field(description=description, json_schema_extra={"pattern": NAME_PATTERN}, **kwargs)


def stage_field(description: str, **kwargs: Any) -> Any:
    return Field(description=description, json_schema_extra={"enum": STAGE_WORDS}, **kwargs)


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
