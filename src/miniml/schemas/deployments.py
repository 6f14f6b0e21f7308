from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, JsonValue, model_validator

from miniml.domain.limits import MAX_ID
from miniml.schemas.common import ReadModel, StrictModel, VersionField, name_field, slug_field, stage_field


class TrafficItem(StrictModel):
    version: int = Field(ge=1, le=MAX_ID)
    weight: int = Field(ge=1, le=100, description="Percent of requests.")


class ShadowSpec(StrictModel):
    version: int = Field(ge=1, le=MAX_ID, description="Version that receives copies of live requests.")
    fraction: float = Field(default=0.1, gt=0, le=1, description="Share of requests copied to it.")


# Either a target or a traffic split, never both (declared for clients; checked in _one_of).
_TARGET_AND_TRAFFIC: dict[str, JsonValue] = {
    "required": ["target", "traffic"],
    "properties": {"target": {"not": {"type": "null"}}, "traffic": {"type": "array"}},
}


class DeploymentTarget(StrictModel):
    target: VersionField | Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="An alias or stage (staging, production) or a version number."
    )
    shadow: ShadowSpec | None = Field(
        default=None, description="A version that predicts on copies of requests, off the request path; never answers."
    )
    traffic: list[TrafficItem] | None = Field(
        default=None, min_length=2, description="A split between two or more versions; weights sum to 100."
    )
    allow_schema_change: bool = Field(
        default=False,
        description="Roll out a version that needs columns (or column types) the version now serving does not "
        "take; without it such a rollout is refused and the old version keeps serving.",
    )

    model_config = ConfigDict(extra="forbid", json_schema_extra={"not": _TARGET_AND_TRAFFIC})

    @model_validator(mode="after")
    def _one_of(self) -> DeploymentTarget:
        if self.traffic is not None:
            if self.target is not None:
                raise ValueError("give either 'target' or 'traffic', not both")
            if len(self.traffic) < 2 or sum(t.weight for t in self.traffic) != 100:
                raise ValueError("'traffic' needs two or more versions whose weights sum to 100")
            if len({t.version for t in self.traffic}) != len(self.traffic):
                raise ValueError("'traffic' names a version twice")
        return self


class DeploymentCreate(DeploymentTarget):
    name: str = slug_field("Endpoint name (slug), unique across projects: it is the URL.")
    model_name: str = name_field("The project's model, e.g. 'iris-clf'.")

    @model_validator(mode="after")
    def _default_target(self) -> DeploymentCreate:
        if self.target is None and self.traffic is None:
            self.target = "staging"
        return self


class DeploymentUpdate(DeploymentTarget):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "not": _TARGET_AND_TRAFFIC,
            "anyOf": [
                {"required": [field], "properties": {field: {"not": {"type": "null"}}}}
                for field in ("target", "traffic", "shadow")
            ],
        },
    )

    @model_validator(mode="after")
    def _something(self) -> DeploymentUpdate:
        if self.target is None and self.traffic is None and self.shadow is None:
            raise ValueError("give a new 'target' or 'traffic'")
        return self


class SeedDeployRequest(StrictModel):
    model_name: str = Field(description="'<project>.<model>', or the model's name with 'project'.")
    stage: str | None = stage_field("staging or production.", default="staging")
    version: VersionField | None = None
    project: str | None = slug_field(
        "The model's project; default the part of model_name before the first dot.", default=None
    )
    name: str | None = slug_field("Endpoint name; default the model's name.", default=None)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["project"], "properties": {"project": {"type": "string"}}},
                {"properties": {"model_name": {"pattern": r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.[A-Za-z0-9]"}}},
            ]
        },
    )


class Variant(ReadModel):
    version: str
    weight: int


class ReplicaView(ReadModel):
    replica: str
    versions: list[str]
    ready: bool
    error: str | None
    updated_at: datetime


class DeploymentRead(ReadModel):
    project: str
    name: str
    model_name: str
    registered_name: str
    target: dict[str, Any]
    previous_target: dict[str, Any] | None
    desired: list[Variant]
    error: str | None = Field(description="Why the desired versions could not be resolved, if they could not.")
    replicas: list[ReplicaView]
    ready: bool = Field(description="Every live replica serves the desired versions.")
    state: Literal["ready", "rolling_out", "rollout_failed", "failed"] = Field(
        description="ready; rolling_out (replicas still loading); rollout_failed (the last change was refused or "
        "failed to load: the old version keeps serving, see rollout_error); failed (the target resolves to nothing)."
    )
    rollout_error: str | None = Field(default=None, description="Why the last rollout failed, while it stands.")
    endpoint: str
    created_at: datetime
    updated_at: datetime


class DeploymentEventRead(ReadModel):
    at: datetime
    key_id: str | None
    action: str
    target: dict[str, Any] | None
    detail: str | None = None


class DesiredDeployment(ReadModel):
    project: str
    name: str
    registered_name: str
    variants: list[Variant]
    shadow: dict[str, Any] | None = None
    error: str | None = None
    allow_schema_change: bool = False


class ShadowReport(ReadModel):
    deployment: str
    shadow_version: str | None
    requests: int
    rows: int
    agreement: float | None = Field(description="Classification: share of rows where both versions agree.")
    mean_abs_difference: float | None = Field(description="Regression: mean |live - shadow|.")
    live_latency_ms: float | None
    shadow_latency_ms: float | None
    records: list[dict[str, Any]] = Field(description="The latest recorded pairs (live, shadow), per replica.")


class ReplicaReport(StrictModel):
    replica: str = Field(max_length=128)
    url: str | None = Field(default=None, max_length=500)
    deployments: dict[str, dict[str, Any]] = Field(description="name → {versions, ready, error}.")


class CallerRead(ReadModel):
    key_id: str
    role: str
    projects: list[str] | None
