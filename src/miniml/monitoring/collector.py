"""Gauges the api computes from the metadata DB at scrape time: drift, live quality, jobs.

They come from the DB, not from process memory, so every api replica reports the same numbers
(dashboards take ``max by (...)``) and a restart loses nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from miniml.db import tables
from miniml.db.tables import utcnow
from miniml.domain.jobs import JobState
from miniml.services import monitoring

log = logging.getLogger("miniml.api")

QUALITY_METRICS = ("accuracy", "f1_macro", "rmse", "mae")


class PlatformCollector(Collector):
    def __init__(self, db: sessionmaker[Session], *, quality_window_s: int) -> None:
        self.db = db
        self.quality_window_s = quality_window_s

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            with self.db.begin() as session:
                yield from self._drift(session)
                yield from self._quality(session)
                yield from self._jobs(session)
        except Exception:  # a scrape must not fail because the DB hiccuped
            log.warning("metrics from the DB are unavailable this scrape", exc_info=True)

    def _drift(self, session: Session) -> Iterator[GaugeMetricFamily]:
        psi = GaugeMetricFamily(
            "miniml_feature_drift_psi",
            "PSI of each feature in the latest drift check against the training data.",
            labels=["project", "deployment", "feature"],
        )
        ks = GaugeMetricFamily(
            "miniml_feature_drift_ks",
            "KS statistic of each numeric feature in the latest drift check.",
            labels=["project", "deployment", "feature"],
        )
        pred = GaugeMetricFamily(
            "miniml_prediction_drift_psi",
            "PSI of the predictions against the training target in the latest drift check.",
            labels=["project", "deployment"],
        )
        rows = GaugeMetricFamily(
            "miniml_drift_rows", "Captured rows the latest drift check compared.", labels=["project", "deployment"]
        )
        age = GaugeMetricFamily(
            "miniml_drift_check_timestamp_seconds",
            "When the latest drift check finished (Unix time).",
            labels=["project", "deployment"],
        )
        projects = {p.id: p.name for p in session.scalars(select(tables.Project))}
        for report in monitoring.latest_drift(session):
            project = projects.get(report.project_id, "")
            for f in report.features:
                psi.add_metric([project, report.deployment, f["feature"]], float(f["psi"]))
                if f.get("ks") is not None:
                    ks.add_metric([project, report.deployment, f["feature"]], float(f["ks"]))
            if report.prediction_psi is not None:
                pred.add_metric([project, report.deployment], report.prediction_psi)
            rows.add_metric([project, report.deployment], report.rows)
            if report.finished_at is not None:
                age.add_metric([project, report.deployment], report.finished_at.timestamp())
        yield from (psi, ks, pred, rows, age)

    def _quality(self, session: Session) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "miniml_model_quality",
            "Live quality of a deployment from feedback in the quality window (accuracy, f1_macro, rmse, mae).",
            labels=["deployment", "metric"],
        )
        labelled = GaugeMetricFamily(
            "miniml_model_feedback_labelled", "Predictions with feedback in the quality window.", labels=["deployment"]
        )
        for name in monitoring.deployments_with_feedback(session):
            q = monitoring.quality_for(session, name, window_s=self.quality_window_s)
            labelled.add_metric([name], q.labelled)
            for metric in QUALITY_METRICS:
                value = getattr(q, metric)
                if value is not None:
                    gauge.add_metric([name, metric], float(value))
        yield from (gauge, labelled)

    def _jobs(self, session: Session) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        by_state = GaugeMetricFamily("miniml_jobs", "Jobs by state and kind.", labels=["state", "kind"])
        # Every state of every kind, zeros included: a panel shows 0 rather than "no data".
        counts = {(state.value, kind): 0 for state in JobState for kind in ("train", "batch")}
        for state, kind, n in session.execute(
            select(tables.Job.state, tables.Job.kind, func.count()).group_by(tables.Job.state, tables.Job.kind)
        ):
            counts[(state, kind)] = n
        for (state, kind), n in sorted(counts.items()):
            by_state.add_metric([state, kind], n)
        trials = CounterMetricFamily("miniml_job_trials", "Trials reported, by state.", labels=["state"])
        for state, n in session.execute(select(tables.JobTrial.state, func.count()).group_by(tables.JobTrial.state)):
            trials.add_metric([state], n)
        duration = GaugeMetricFamily(
            "miniml_job_duration_seconds",
            "Run time of the jobs that finished in the last 24 hours: p50, p95 and max.",
            labels=["stat"],
        )
        since = utcnow() - timedelta(hours=24)
        spans = sorted(
            (end - start).total_seconds()
            for start, end in session.execute(
                select(tables.Job.started_at, tables.Job.finished_at).where(
                    tables.Job.finished_at >= since, tables.Job.started_at.is_not(None)
                )
            )
            if start is not None and end is not None
        )
        if spans:
            for stat, q in (("p50", 0.5), ("p95", 0.95)):
                duration.add_metric([stat], spans[min(len(spans) - 1, int(q * len(spans)))])
            duration.add_metric(["max"], spans[-1])
        yield from (by_state, trials, duration)
