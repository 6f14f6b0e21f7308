"""Tasks and metrics: which metric fits which task, and which way is better."""

from __future__ import annotations

from enum import StrEnum


class Task(StrEnum):
    auto = "auto"
    classification = "classification"
    regression = "regression"


# metric → (task, maximise?)
METRICS: dict[str, tuple[Task, bool]] = {
    "f1_macro": (Task.classification, True),
    "accuracy": (Task.classification, True),
    "roc_auc": (Task.classification, True),
    "log_loss": (Task.classification, False),
    "rmse": (Task.regression, False),
    "mae": (Task.regression, False),
    "r2": (Task.regression, True),
}
DEFAULT_METRIC = {Task.classification: "f1_macro", Task.regression: "rmse"}
# An integer target with at most this many distinct values is a classification target.
MAX_CLASSES_FOR_INTEGER_TARGET = 20


def detect_task(target_profile: dict[str, object], rows: int) -> Task:
    """Classification for non-numeric targets or integer targets with few distinct values."""
    if target_profile["kind"] != "numeric":
        return Task.classification
    distinct = int(target_profile["distinct_count"])  # type: ignore[call-overload]
    if target_profile.get("integer") and distinct <= min(MAX_CLASSES_FOR_INTEGER_TARGET, max(2, rows // 5)):
        return Task.classification
    return Task.regression


def maximise(metric: str) -> bool:
    return METRICS[metric][1]
