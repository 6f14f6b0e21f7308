from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import ConfigDict, Field

from miniml.data.profiles import ColumnKind
from miniml.schemas.common import ReadModel, StrictModel


class ColumnSchema(ReadModel):
    name: str
    kind: ColumnKind
    arrow_type: str


class DatasetVersionRead(ReadModel):
    project: str
    dataset: str
    version: int
    sha256: str
    size_bytes: int
    format: str
    delimiter: str
    filename: str
    rows: int
    columns: list[ColumnSchema]
    profile: dict[str, Any] = Field(description="Per-column type, nulls, min/max/mean/std, distinct, top, histogram.")
    uri: str = Field(description="Where the file is stored: file:///… locally, s3://… on S3.")
    s3_uri: str = Field(description="The seed's name for `uri`.")
    created_at: datetime
    created_by: str | None


class DatasetRead(ReadModel):
    project: str
    name: str
    created_at: datetime
    created_by: str | None
    latest_version: int | None
    version_count: int


class ColumnRule(StrictModel):
    min: float | None = None
    max: float | None = None
    allow_nulls: bool | None = None
    allowed_values: list[str | int | float | bool] | None = None
    unique: bool | None = None
    dtype: ColumnKind | None = None


class ValidationRequest(StrictModel):
    rules: dict[str, ColumnRule] = Field(description="Column name → its rules.")


class SeedValidationRequest(ValidationRequest):
    project: str
    dataset_s3_uri: str | None = Field(default=None, description="The `s3_uri` an upload returned.")
    dataset: str | None = None
    version: int | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["dataset_s3_uri"], "properties": {"dataset_s3_uri": {"type": "string"}}},
                {
                    "required": ["dataset", "version"],
                    "properties": {"dataset": {"type": "string"}, "version": {"type": "integer"}},
                },
            ]
        },
    )


class ValidationIssue(ReadModel):
    column: str
    rule: str
    count: int
    example_rows: list[int] = Field(description="1-based data row numbers (the header is not counted).")
    detail: str | None = None


class ValidationReport(ReadModel):
    ok: bool
    rows: int
    columns: int
    issues: list[ValidationIssue]


class PreviewRead(ReadModel):
    columns: list[str]
    rows: list[dict[str, Any]]
