from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from miniml.schemas.common import ReadModel, StrictModel, stage_field


def normalise_stage(value: str) -> str:
    stage = value.strip().lower()
    if stage not in ("staging", "production"):
        raise ValueError("stage must be 'staging' or 'production' (the words Staging and Production work too)")
    return stage


class ApprovalRead(ReadModel):
    """SageMaker's model approval status, kept on the version (MLflow version tags)."""

    status: Literal["pending", "approved", "rejected"]
    requested_by: str | None = None
    request_note: str | None = None
    requested_at: datetime | None = None
    decided_by: str | None = None
    decision_note: str | None = None
    decided_at: datetime | None = None


class ApprovalRequest(StrictModel):
    action: Literal["request", "approve", "reject"] = Field(
        description="request (an engineer asks for production), approve (an admin: the version becomes "
        "production) or reject (an admin: it does not)."
    )
    note: str = Field(min_length=1, max_length=1000, description="Why: shown on the version and in the audit log.")


class ModelVersionRead(ReadModel):
    model: str
    registered_name: str
    version: str
    aliases: list[str]
    stage: str | None
    status: str | None
    created_at: datetime | None
    run_id: str | None
    metrics: dict[str, float] = Field(description="Held-out (test_*) and other run metrics.")
    params: dict[str, str]
    family: str | None
    job_id: int | None
    dataset: str | None
    dataset_version: int | None
    dataset_sha256: str | None
    approval: ApprovalRead | None = Field(default=None, description="Its approval for production, if one was asked.")


class ModelRead(ReadModel):
    name: str
    registered_name: str
    aliases: dict[str, str]
    latest_version: str | None
    description: str | None


class ModelComparison(ReadModel):
    model: str
    a: ModelVersionRead
    b: ModelVersionRead
    metric_differences: dict[str, float] = Field(description="b minus a, for metrics both have.")


class PromoteRequest(StrictModel):
    stage: str = stage_field("staging or production.")

    @field_validator("stage")
    @classmethod
    def _stage(cls, value: str) -> str:
        return normalise_stage(value)


class SeedPromoteRequest(StrictModel):
    model_name: str
    version: int | str
    to_stage: str = stage_field("staging or production.")
    project: str | None = None

    @field_validator("to_stage")
    @classmethod
    def _stage(cls, value: str) -> str:
        return normalise_stage(value)


def params_of(run: Any) -> dict[str, str]:
    return dict(run.data.params) if run is not None else {}
