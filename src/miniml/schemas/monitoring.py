"""Drift reports, feedback and model quality, and retraining policies and decisions."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from miniml.schemas.common import ReadModel, StrictModel, VersionField


class RetrainPolicy(StrictModel):
    schedule: str | None = Field(
        default=None, description="Cron expression (UTC) for scheduled retraining, e.g. '0 3 * * 1'; none: no schedule."
    )
    drift_threshold: float | None = Field(
        default=None, gt=0, description="Retrain when a drift check finds a feature with PSI above this (e.g. 0.25)."
    )
    min_improvement: float = Field(
        default=0.0, ge=0, description="Promote the challenger only if it beats the champion by at least this much."
    )
    dataset: Literal["latest"] | VersionField = Field(
        default="latest", description="Train on the newest version of the champion's dataset, or a pinned version."
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from cronsim import CronSim, CronSimError

        try:
            CronSim(value, datetime(2000, 1, 1))
        except CronSimError as exc:
            raise ValueError(
                f"'{value}' is not a cron expression ({exc}); e.g. '0 3 * * *' is daily at 03:00"
            ) from None
        return value


class MonitoringUpdate(StrictModel):
    drift_interval_s: int | None = Field(
        default=None, ge=0, le=30 * 86400, description="Seconds between scheduled drift checks; 0 turns them off."
    )
    drift_window_s: int | None = Field(
        default=None, ge=60, le=90 * 86400, description="How far back a drift check reads captured requests."
    )
    retrain: RetrainPolicy | None = Field(default=None, description="The retraining policy; null removes it.")


class MonitoringRead(ReadModel):
    deployment: str
    drift_interval_s: int
    drift_window_s: int
    retrain: RetrainPolicy | None


class FeatureDrift(ReadModel):
    feature: str
    kind: str
    rows: int
    psi: float
    drifted: bool
    ks: float | None = None
    ks_p_value: float | None = None
    mean: float | None = None
    reference_mean: float | None = None


class DriftReportRead(ReadModel):
    id: int
    deployment: str
    trigger: str
    state: str = Field(description="queued, running, done, no_data (too few captured rows) or failed.")
    created_at: datetime
    finished_at: datetime | None
    window_s: int
    flow_run_id: str | None
    model_version: str | None
    reference: dict[str, Any] | None = Field(description="The training dataset version compared against.")
    rows: int
    features: list[FeatureDrift]
    prediction_psi: float | None
    max_psi: float | None
    drifted: list[str] = Field(description="Features whose PSI is above 0.25.")
    error: str | None


class DriftReports(ReadModel):
    latest: DriftReportRead | None = Field(description="The newest finished report.")
    history: list[DriftReportRead] = Field(description="Every report, newest first.")


class DriftContext(ReadModel):
    """(worker) What a drift check compares: the capture prefix and window, and the reference profile."""

    report_id: int
    project: str
    deployment: str
    capture_prefix: str
    # Rows captured before this (epoch seconds: the deployment's creation) belong to an earlier
    # deployment of the same name, in this project or in a deleted one of the same name.
    capture_since: float = 0.0
    window_s: int
    min_rows: int
    profile: dict[str, Any]
    target: str | None
    reference: dict[str, Any]


class DriftResult(StrictModel):
    """(worker) A finished drift check."""

    state: Literal["done", "no_data", "failed"]
    rows: int = 0
    features: list[dict[str, Any]] = Field(default_factory=list)
    prediction_psi: float | None = None
    max_psi: float | None = None
    drifted: list[str] = Field(default_factory=list)
    model_version: str | None = None
    error: str | None = None


class FeedbackIn(StrictModel):
    prediction_id: str = Field(max_length=100, description="An id from a prediction response's `prediction_ids`.")
    label: Any = Field(description="The true label (or value, for regression).")


class FeedbackBatch(StrictModel):
    feedback: list[FeedbackIn] = Field(min_length=1, max_length=10_000)


class FeedbackRecord(StrictModel):
    """(inference) A label joined with the prediction it is for."""

    deployment: str
    prediction_id: str = Field(max_length=100)
    version: str
    predicted: Any
    label: Any
    predicted_at: datetime


class QualityRead(ReadModel):
    deployment: str
    window_s: int
    task: str | None = Field(description="classification or regression, from the predictions' type.")
    labelled: int = Field(description="Predictions with feedback in the window.")
    accuracy: float | None = None
    f1_macro: float | None = None
    rmse: float | None = None
    mae: float | None = None
    by_version: dict[str, dict[str, float | int | None]] = Field(default_factory=dict)


class RetrainingRead(ReadModel):
    id: int
    deployment: str
    trigger: str = Field(description="schedule, drift or manual.")
    drift_report_id: int | None
    state: str = Field(description="training, evaluating, promoted, kept or failed.")
    created_at: datetime
    finished_at: datetime | None
    policy: dict[str, Any]
    job_id: int | None
    flow_run_id: str | None
    metric: str | None
    champion_version: str | None
    challenger_version: str | None
    champion_score: float | None
    challenger_score: float | None
    promoted: bool
    reason: str | None


class EvaluationContext(ReadModel):
    """(worker) Champion and challenger, and the data both are scored on."""

    retraining_id: int
    project: str
    deployment: str
    registered_name: str
    champion_version: str
    challenger_version: str
    dataset: str
    dataset_version: int
    target: str
    task: str
    metric: str
    test_size: float
    seed: int


class EvaluationResult(StrictModel):
    """(worker) Both scores on the same held-out rows, or why they could not be computed."""

    champion_score: float | None = None
    challenger_score: float | None = None
    rows: int = 0
    error: str | None = None


class TrafficRead(ReadModel):
    deployment: str
    minutes: int
    step_s: int
    series: dict[str, list[list[float]]] = Field(
        description="requests_per_s, errors_per_s and p95_latency_ms: [unix time, value] points."
    )
    totals: dict[str, float] = Field(description="requests and errors since the replicas started.")
