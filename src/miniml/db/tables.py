"""SQLAlchemy tables of the metadata DB. Schema changes go through Alembic (db/migrations)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Every stored time is UTC; SQLite forgets the zone, so it is put back on load."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class Project(Base):
    __tablename__ = "project"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(32))


class ApiKey(Base):
    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(32))
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()
    grants: Mapped[list[KeyGrant]] = relationship(cascade="all, delete-orphan", lazy="selectin")


class KeyGrant(Base):
    """A non-admin key may touch exactly the projects it is granted."""

    __tablename__ = "key_grant"

    key_id: Mapped[str] = mapped_column(ForeignKey("api_key.id", ondelete="CASCADE"), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), primary_key=True)
    project: Mapped[Project] = relationship(lazy="joined")


class AuditEvent(Base):
    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(200))
    project: Mapped[str | None] = mapped_column(String(63), index=True)
    target: Mapped[str] = mapped_column(String(500), default="")
    status: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class PlatformSecret(Base):
    """Secrets the platform generates for itself (the JWT key), shared by every replica."""

    __tablename__ = "platform_secret"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    __tablename__ = "dataset"
    __table_args__ = (UniqueConstraint("project_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(32))
    project: Mapped[Project] = relationship(lazy="joined")


class DatasetVersion(Base):
    """One immutable upload. Same bytes under the same name are the same version (by sha256)."""

    __tablename__ = "dataset_version"
    __table_args__ = (UniqueConstraint("dataset_id", "version"), UniqueConstraint("dataset_id", "sha256"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16))
    delimiter: Mapped[str] = mapped_column(String(1), default=",")
    filename: Mapped[str] = mapped_column(String(255), default="")
    object_key: Mapped[str] = mapped_column(String(500), unique=True)
    row_count: Mapped[int] = mapped_column(BigInteger)
    column_types: Mapped[dict[str, Any]] = mapped_column(default=dict)
    profile: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(32))
    dataset: Mapped[Dataset] = relationship(lazy="joined")


class Job(Base):
    __tablename__ = "job"
    __table_args__ = (UniqueConstraint("project_id", "idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    dataset_version_id: Mapped[int] = mapped_column(ForeignKey("dataset_version.id"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column()
    state: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(32))
    submitted_at: Mapped[datetime | None] = mapped_column()
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    worker: Mapped[str | None] = mapped_column(String(128))
    # The one worker (of several sharing the study) that refits and registers the best model.
    finalizer: Mapped[str | None] = mapped_column(String(128))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    # Bit k set once shard k of the job has started: each shard runs once, in any order.
    shards_started: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    trials_claimed: Mapped[int] = mapped_column(Integer, default=0)
    trials_done: Mapped[int] = mapped_column(Integer, default=0)
    best_score: Mapped[float | None] = mapped_column()
    best_family: Mapped[str | None] = mapped_column(String(64))
    test_metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    # Ended, with MLflow runs not yet known to be ended to match (the api's supervisor does it).
    runs_open: Mapped[bool] = mapped_column(default=False, server_default=false())
    model_name: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(32))
    # "train", or "batch" (predictions for a dataset version, written as a new dataset version).
    kind: Mapped[str] = mapped_column(String(16), default="train", server_default="train")
    output: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    project: Mapped[Project] = relationship(lazy="joined")
    dataset_version: Mapped[DatasetVersion] = relationship(lazy="joined")


class JobTrial(Base):
    __tablename__ = "job_trial"

    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    family: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    score: Mapped[float | None] = mapped_column()
    duration_s: Mapped[float] = mapped_column(default=0.0)
    state: Mapped[str] = mapped_column(String(16))
    worker: Mapped[str] = mapped_column(String(128), default="")
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobLog(Base):
    __tablename__ = "job_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)


class Deployment(Base):
    """A named endpoint. Names are unique across projects: they are the endpoint's URL."""

    __tablename__ = "deployment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    model_name: Mapped[str] = mapped_column(String(128))
    target: Mapped[dict[str, Any]] = mapped_column()
    previous_target: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Drift schedule and window, and the retraining policy (None: no automatic retraining).
    drift_interval_s: Mapped[int] = mapped_column(Integer, default=600, server_default="600")
    drift_window_s: Mapped[int] = mapped_column(Integer, default=3600, server_default="3600")
    retrain_policy: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The last rollout a replica refused (None once a change is accepted): the version and why.
    rollout_error: Mapped[str | None] = mapped_column(Text)
    rollout_version: Mapped[str | None] = mapped_column(String(32))
    # Set by the change that allowed new columns (or a rollback): the replicas let it switch.
    allow_schema_change: Mapped[bool] = mapped_column(default=False, server_default=false())
    project: Mapped[Project] = relationship(lazy="joined")


class DriftReport(Base):
    """One drift check of a deployment: queued, run by a worker's Prefect flow, then stored."""

    __tablename__ = "drift_report"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    deployment: Mapped[str] = mapped_column(String(63), index=True)
    trigger: Mapped[str] = mapped_column(String(16))  # schedule | manual
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued | running | done | no_data | failed
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    window_s: Mapped[int] = mapped_column(Integer)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    reference: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the dataset version compared against
    rows: Mapped[int] = mapped_column(Integer, default=0)
    features: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    prediction_psi: Mapped[float | None] = mapped_column()
    max_psi: Mapped[float | None] = mapped_column()
    drifted: Mapped[list[str]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text)


class Feedback(Base):
    """A true label for one served prediction, joined with what the model predicted."""

    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("deployment", "prediction_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    deployment: Mapped[str] = mapped_column(String(63), index=True)
    prediction_id: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(32))
    predicted: Mapped[Any] = mapped_column(JSON)
    label: Mapped[Any] = mapped_column(JSON)
    predicted_at: Mapped[datetime] = mapped_column()
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Retraining(Base):
    """One retraining of a deployment: the challenger's job, both scores, and the decision."""

    __tablename__ = "retraining"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    deployment: Mapped[str] = mapped_column(String(63), index=True)
    trigger: Mapped[str] = mapped_column(String(16))  # schedule | drift | manual
    drift_report_id: Mapped[int | None] = mapped_column(Integer)
    # training -> evaluating -> promoted | kept | failed
    state: Mapped[str] = mapped_column(String(16), default="training")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_id: Mapped[int | None] = mapped_column(Integer)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    metric: Mapped[str | None] = mapped_column(String(32))
    champion_version: Mapped[str | None] = mapped_column(String(32))
    challenger_version: Mapped[str | None] = mapped_column(String(32))
    champion_score: Mapped[float | None] = mapped_column()
    challenger_score: Mapped[float | None] = mapped_column()
    promoted: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str | None] = mapped_column(Text)


class DeploymentEvent(Base):
    """Deployment history: every create, update, rollback and delete, with what it resolved to."""

    __tablename__ = "deployment_event"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    deployment: Mapped[str] = mapped_column(String(63), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    key_id: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    detail: Mapped[str | None] = mapped_column(Text)


class InferenceReplica(Base):
    """What each inference replica last said it serves."""

    __tablename__ = "inference_replica"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    url: Mapped[str | None] = mapped_column(String(500))
    status: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


__all__ = [
    "ApiKey",
    "AuditEvent",
    "Base",
    "Dataset",
    "DatasetVersion",
    "Deployment",
    "DeploymentEvent",
    "DriftReport",
    "Feedback",
    "InferenceReplica",
    "Job",
    "JobLog",
    "JobTrial",
    "KeyGrant",
    "PlatformSecret",
    "Project",
    "Retraining",
    "UniqueConstraint",
]
