"""Drift checks and champion/challenger evaluations, run by a worker and reported to the api.

A drift check reads the captured requests of its window from the object store (JSON lines under
``capture/{project}/{deployment}/{day}/``) and compares them with the training dataset's profile.
An evaluation scores the champion and the challenger on the same held-out rows of the dataset
version the challenger was trained on. The api decides what happens next.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from miniml.config import Settings
from miniml.errors import public_reason
from miniml.monitoring.drift import drift_report
from miniml.schemas.monitoring import DriftContext, DriftReportRead, DriftResult, EvaluationResult, RetrainingRead
from miniml.sdk.client import Client
from miniml.storage import ObjectStore, make_store
from miniml.tracking.signing import load_verified, signing_key

log = logging.getLogger("miniml.worker")

# The newest captured rows a check reads at most: enough for stable PSI, bounded memory.
MAX_ROWS = 200_000


def read_capture(store: ObjectStore, prefix: str, since: float) -> tuple[dict[str, list[Any]], list[Any], Counter[str]]:
    """Columns, predictions and model versions of the rows captured since ``since`` (newest first, capped)."""
    keys = []
    first = datetime.fromtimestamp(since, UTC).date()
    days = [first + timedelta(days=i) for i in range((datetime.now(UTC).date() - first).days + 1)]
    # Only the day folders the window touches: old capture is never listed.
    listed = [k for day in days for k in store.list_keys(f"{prefix}{day.isoformat()}/")]
    for key in listed:
        stem = key.rsplit("/", 1)[-1].split("-", 1)[0]
        # A file is written at flush time, after every line in it: older files hold only older rows.
        if stem.isdigit() and int(stem) >= since * 1000:
            keys.append((int(stem), key))
    columns: dict[str, list[Any]] = {}
    predictions: list[Any] = []
    versions: Counter[str] = Counter()
    for _, key in sorted(keys, reverse=True):
        data = b"".join(store.iter_bytes(key))
        for line in data.splitlines():
            if len(predictions) >= MAX_ROWS:
                break
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # a torn line (storage hiccup) is skipped, not fatal
            if float(item.get("at", 0)) < since:
                continue
            n = len(item["predictions"])
            for name, values in item["columns"].items():
                columns.setdefault(name, [None] * len(predictions)).extend(values)
            predictions.extend(item["predictions"])
            for values in columns.values():  # a column missing from this line: pad it
                if len(values) < len(predictions):
                    values.extend([None] * (len(predictions) - len(values)))
            versions[str(item.get("version"))] += n
    return columns, predictions, versions


def run_drift_check(client: Client, settings: Settings, project: str, deployment: str, report_id: int) -> str:
    reports = client.monitor_reports
    ctx: DriftContext = reports.drift_context(project, deployment, report_id)
    try:
        store = make_store(settings)
        since = max(time.time() - ctx.window_s, ctx.capture_since)  # not an earlier deployment's rows
        columns, predictions, versions = read_capture(store, ctx.capture_prefix, since)
        if len(predictions) < ctx.min_rows:
            result = DriftResult(
                state="no_data",
                rows=len(predictions),
                error=f"only {len(predictions)} captured rows in the last {ctx.window_s}s; a check needs "
                f"{ctx.min_rows} (send traffic, or widen drift_window_s)",
            )
        else:
            report = drift_report(ctx.profile, ctx.target, columns, predictions)
            result = DriftResult(
                state="done",
                rows=report["rows"],
                features=report["features"],
                prediction_psi=report["prediction_psi"],
                max_psi=report["max_psi"],
                drifted=report["drifted"],
                model_version=versions.most_common(1)[0][0] if versions else None,
            )
    except Exception as exc:  # reported on the check, not lost in a worker log
        log.exception("drift check failed", extra={"deployment": deployment, "report": report_id})
        result = DriftResult(state="failed", error=f"{type(exc).__name__}: {str(exc)[:500]}")
    done: DriftReportRead = reports.drift_result(project, deployment, report_id, result)
    return done.state


def run_evaluation(client: Client, settings: Settings, project: str, deployment: str, retraining_id: int) -> str:

    from miniml.domain.tasks import Task
    from miniml.orchestration.runner import _table
    from miniml.training.data import features_from_profile, load_frame, split
    from miniml.training.search import score

    reports = client.monitor_reports
    ctx = reports.evaluation_context(project, deployment, retraining_id)
    try:
        version = client.datasets.version(project, ctx.dataset, ctx.dataset_version)
        with tempfile.TemporaryDirectory(prefix=f"miniml-eval-{retraining_id}-") as tmp:
            path = client.datasets.download(
                project, ctx.dataset, ctx.dataset_version, Path(tmp) / f"data.{version.format}"
            )
            frame = load_frame(_table(path, version))
        features = features_from_profile(version.profile, ctx.target)
        data = split(frame, features, ctx.target, Task(ctx.task), test_size=ctx.test_size, seed=ctx.seed)
        key = signing_key(settings.auth.model_signing_key, settings.data_dir)
        scores = {}
        for which, v in (("champion", ctx.champion_version), ("challenger", ctx.challenger_version)):
            model, _signature = load_verified(settings.mlflow_uri, ctx.registered_name, str(v), key)
            scores[which] = score(ctx.metric, model, data.x_test, data.y_test)
        result = EvaluationResult(
            champion_score=scores["champion"], challenger_score=scores["challenger"], rows=len(data.x_test)
        )
    except Exception as exc:
        log.exception("evaluation failed", extra={"deployment": deployment, "retraining": retraining_id})
        result = EvaluationResult(error=public_reason(exc, limit=500))
    done: RetrainingRead = reports.evaluation_result(project, deployment, retraining_id, result)
    return done.state
