"""Drift checks, feedback and live quality, and retraining with champion/challenger.

The api owns every state here; workers do the heavy parts as Prefect flow runs (a drift check
reads the captured requests, an evaluation scores both models) and report back. No flow waits
for another: a retraining's training job is an ordinary job, and when it ends the api submits
the evaluation.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from miniml.db import tables
from miniml.db.tables import utcnow
from miniml.domain.jobs import JobState
from miniml.domain.tenancy import Caller
from miniml.errors import Conflict, InvalidInput, MiniMLError, NotFound
from miniml.schemas.monitoring import (
    DriftContext,
    DriftReportRead,
    DriftReports,
    DriftResult,
    EvaluationContext,
    EvaluationResult,
    FeedbackRecord,
    MonitoringRead,
    MonitoringUpdate,
    QualityRead,
    RetrainingRead,
    RetrainPolicy,
)
from miniml.services import audit
from miniml.services.deployments import read_deployment, resolve
from miniml.services.jobs import log as job_log
from miniml.tracking.registry import STAGES, Registry, registered_name

ACTIVE_DRIFT = ("queued", "running")
ACTIVE_RETRAINING = ("training", "evaluating")


# Settings -----------------------------------------------------------------------------------


def policy_of(dep: tables.Deployment) -> RetrainPolicy | None:
    """The retraining policy (stored with "_since", when it was set: its cron counts from then)."""
    if not dep.retrain_policy:
        return None
    return RetrainPolicy.model_validate({k: v for k, v in dep.retrain_policy.items() if not k.startswith("_")})


def monitoring_read(dep: tables.Deployment) -> MonitoringRead:
    policy = policy_of(dep)
    return MonitoringRead(
        deployment=dep.name, drift_interval_s=dep.drift_interval_s, drift_window_s=dep.drift_window_s, retrain=policy
    )


def update_monitoring(
    session: Session, caller: Caller, project: str, name: str, body: MonitoringUpdate
) -> tables.Deployment:
    dep = read_deployment(session, caller, project, name)
    if body.drift_interval_s is not None:
        dep.drift_interval_s = body.drift_interval_s
    if body.drift_window_s is not None:
        dep.drift_window_s = body.drift_window_s
    if "retrain" in body.model_fields_set:
        if body.retrain is not None and dep.target.get("kind") == "split":
            raise InvalidInput(
                f"Deployment {name!r} splits traffic between versions; retraining replaces one champion. "
                "Point it at an alias or a version first."
            )
        dep.retrain_policy = (
            body.retrain.model_dump() | {"_since": utcnow().isoformat()} if body.retrain is not None else None
        )
    session.flush()
    return dep


# Lineage: which job (and dataset version) made what a deployment serves ---------------------


@dataclass(frozen=True)
class Champion:
    """What MLflow said a deployment serves, or why it could not say. Asked before the transaction
    that records a check or retraining, so that no DB lock waits on MLflow."""

    version: str = ""
    job_id: int | None = None  # the miniml job that trained it, from its run's tag
    error: MiniMLError | None = None


def ask_champion(registry: Registry, project: str, model_name: str, target: dict[str, Any]) -> Champion:
    """The version a target serves (the heaviest variant) and its run's job id; MLflow only, no DB."""
    try:
        variants = resolve(registry, project, model_name, target)
        version = max(variants, key=lambda v: v.weight).version
        mv = registry.version(project, model_name, version)
        run = registry.run(mv.run_id)
    except MiniMLError as exc:
        return Champion(error=exc)
    job_id = (dict(run.data.tags) if run is not None else {}).get("miniml.job_id", "")
    return Champion(version=version, job_id=int(job_id) if job_id.isdigit() else None)


def champion(
    session: Session, registry: Registry, dep: tables.Deployment, asked: Champion | None = None
) -> tuple[str, tables.Job]:
    """The version the deployment serves (the heaviest variant) and the job that trained it."""
    if asked is None:
        asked = ask_champion(registry, dep.project.name, dep.model_name, dep.target)
    if asked.error is not None:
        raise asked.error
    job = session.get(tables.Job, asked.job_id) if asked.job_id is not None else None
    if job is None or job.project_id != dep.project_id:
        raise InvalidInput(
            f"Version {asked.version} of {dep.model_name!r} was not trained by a miniml job, so its training data "
            "is unknown; drift and retraining need a version trained here."
        )
    return asked.version, job


# Drift ----------------------------------------------------------------------------------------


def create_drift_check(
    session: Session, registry: Registry, dep: tables.Deployment, *, trigger: str, asked: Champion | None = None
) -> tables.DriftReport:
    busy = session.scalar(
        select(tables.DriftReport).where(
            tables.DriftReport.deployment == dep.name, tables.DriftReport.state.in_(ACTIVE_DRIFT)
        )
    )
    if busy is not None:
        if trigger == "manual":
            raise Conflict(f"Drift check {busy.id} of {dep.name!r} is still {busy.state}; wait for it to finish.")
        return busy
    report = tables.DriftReport(
        project_id=dep.project_id, deployment=dep.name, trigger=trigger, window_s=dep.drift_window_s
    )
    try:
        version, job = champion(session, registry, dep, asked)
        dv = job.dataset_version
        report.model_version = version
        report.reference = {"dataset": dv.dataset.name, "version": dv.version, "job_id": job.id}
    except MiniMLError as exc:
        if trigger == "manual":
            raise
        report.state, report.error, report.finished_at = "failed", exc.detail, utcnow()
    session.add(report)
    session.flush()
    return report


def _report(session: Session, caller: Caller, project: str, name: str, report_id: int) -> tables.DriftReport:
    dep = read_deployment(session, caller, project, name)
    report = session.get(tables.DriftReport, report_id)
    if report is None or report.deployment != dep.name or report.project_id != dep.project_id:
        raise NotFound(f"Drift report {report_id} does not exist for deployment {name!r}.")
    return report


def drift_context(
    session: Session, caller: Caller, project: str, name: str, report_id: int, *, min_rows: int
) -> DriftContext:
    report = _report(session, caller, project, name, report_id)
    if report.state not in ACTIVE_DRIFT or report.reference is None:
        raise Conflict(f"Drift report {report_id} is {report.state}; only a queued or running check can run.")
    job = session.get(tables.Job, int(report.reference["job_id"]))
    if job is None:
        raise Conflict(f"The job behind drift report {report_id} was deleted; start a new check.")
    report.state = "running"
    session.flush()
    created = read_deployment(session, caller, project, name).created_at
    return DriftContext(
        report_id=report.id,
        project=project,
        deployment=name,
        capture_prefix=f"capture/{project}/{name}/",
        capture_since=(created if created.tzinfo else created.replace(tzinfo=UTC)).timestamp(),
        window_s=report.window_s,
        min_rows=min_rows,
        profile=job.dataset_version.profile,
        target=job.spec.get("target"),
        reference=report.reference,
    )


def record_drift(
    session: Session, registry: Registry, caller: Caller, project: str, name: str, report_id: int, body: DriftResult
) -> tuple[tables.DriftReport, tables.Retraining | None]:
    """Store a finished check; a policy's drift threshold crossed starts a retraining."""
    report = _report(session, caller, project, name, report_id)
    if report.state not in ACTIVE_DRIFT:
        raise Conflict(f"Drift report {report_id} is already {report.state}.")
    dep = read_deployment(session, caller, project, name)
    policy = policy_of(dep)
    over = (
        body.state == "done"
        and policy is not None
        and policy.drift_threshold is not None
        and (body.max_psi or 0.0) > policy.drift_threshold
    )
    # MLflow is asked before the first write: the write lock is not held while it answers.
    asked = ask_champion(registry, project, dep.model_name, dep.target) if over else None
    report.state, report.rows, report.features = body.state, body.rows, body.features
    report.prediction_psi, report.max_psi, report.drifted = body.prediction_psi, body.max_psi, body.drifted
    report.model_version = body.model_version or report.model_version
    report.error, report.finished_at = body.error, utcnow()
    session.flush()
    retraining = None
    if over:
        try:
            retraining = create_retraining(
                session, registry, dep, trigger="drift", drift_report_id=report.id, asked=asked
            )
        except MiniMLError as exc:
            report.error = f"drift over the threshold, but no retraining started: {exc.detail}"
    return report, retraining


def drift_reports(session: Session, caller: Caller, project: str, name: str, *, limit: int) -> DriftReports:
    dep = read_deployment(session, caller, project, name)
    rows = session.scalars(
        select(tables.DriftReport)
        .where(tables.DriftReport.deployment == dep.name, tables.DriftReport.project_id == dep.project_id)
        .order_by(tables.DriftReport.id.desc())
        .limit(limit)
    ).all()
    history = [DriftReportRead.model_validate(r) for r in rows]
    latest = next((r for r in history if r.state == "done"), None)
    return DriftReports(latest=latest, history=history)


def _last_by_deployment(session: Session, table: type[tables.DriftReport] | type[tables.Retraining]) -> dict[str, Any]:
    """When each deployment last got a row of this table."""
    query = select(table.deployment, func.max(table.created_at)).group_by(table.deployment)
    return {name: at for name, at in session.execute(query).all()}


def due_drift_checks(session: Session) -> list[tables.Deployment]:
    """Deployments whose scheduled drift check is due (none queued or running, the last one old enough)."""
    now = utcnow()
    last = _last_by_deployment(session, tables.DriftReport)
    due = []
    for dep in session.scalars(select(tables.Deployment).where(tables.Deployment.drift_interval_s > 0)):
        previous = last.get(dep.name)
        if previous is None:
            # The first check waits one interval: there is nothing captured yet at deploy time.
            previous = dep.created_at
        if previous + timedelta(seconds=dep.drift_interval_s) <= now:
            due.append(dep)
    return due


def unsubmitted_drift(session: Session) -> list[tables.DriftReport]:
    return list(
        session.scalars(
            select(tables.DriftReport).where(
                tables.DriftReport.state == "queued", tables.DriftReport.flow_run_id.is_(None)
            )
        )
    )


def latest_drift(session: Session) -> list[tables.DriftReport]:
    """Each deployment's newest finished report (for the gauges)."""
    newest = (
        select(func.max(tables.DriftReport.id))
        .where(tables.DriftReport.state == "done")
        .group_by(tables.DriftReport.deployment)
    )
    return list(session.scalars(select(tables.DriftReport).where(tables.DriftReport.id.in_(newest))))


# Feedback and quality ---------------------------------------------------------------------------


_FEEDBACK_ATTEMPTS = 3


def record_feedback(session: Session, records: list[FeedbackRecord]) -> int:
    """Store labels; a second label for the same prediction replaces the first."""
    deps = {d.name: d for d in session.scalars(select(tables.Deployment))}
    # A label for the same prediction may be stored by another request at the same moment (a
    # client's retry): the loser's savepoint is undone and the batch runs again, then updating.
    for _attempt in range(_FEEDBACK_ATTEMPTS - 1):
        try:
            with session.begin_nested():
                return _store_feedback(session, deps, records)
        except IntegrityError:
            session.expire_all()
    return _store_feedback(session, deps, records)


def _store_feedback(session: Session, deps: dict[str, tables.Deployment], records: list[FeedbackRecord]) -> int:
    stored = 0
    for rec in records:
        dep = deps.get(rec.deployment)
        if dep is None:
            continue  # deleted meanwhile
        row = session.scalar(
            select(tables.Feedback).where(
                tables.Feedback.deployment == rec.deployment, tables.Feedback.prediction_id == rec.prediction_id
            )
        )
        if row is None:
            row = tables.Feedback(project_id=dep.project_id, deployment=rec.deployment, prediction_id=rec.prediction_id)
            session.add(row)
        row.version, row.predicted, row.label = rec.version, rec.predicted, rec.label
        row.predicted_at, row.at = rec.predicted_at, utcnow()
        stored += 1
    session.flush()
    return stored


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def quality_of(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Accuracy and macro F1 for labels, RMSE and MAE for numbers."""
    if not pairs:
        return {"task": None, "labelled": 0}
    if all(_is_number(p) and _is_number(y) for p, y in pairs) and not all(
        isinstance(p, int) and isinstance(y, int) for p, y in pairs
    ):
        errors = [float(p) - float(y) for p, y in pairs]
        return {
            "task": "regression",
            "labelled": len(pairs),
            "rmse": math.sqrt(sum(e * e for e in errors) / len(errors)),
            "mae": sum(abs(e) for e in errors) / len(errors),
        }
    predicted = [str(p) for p, _ in pairs]
    actual = [str(y) for _, y in pairs]
    correct = sum(p == y for p, y in zip(predicted, actual, strict=True))
    f1s = []
    for label in sorted(set(actual) | set(predicted)):
        tp = sum(p == label and y == label for p, y in zip(predicted, actual, strict=True))
        fp = Counter(predicted)[label] - tp
        fn = Counter(actual)[label] - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "task": "classification",
        "labelled": len(pairs),
        "accuracy": correct / len(pairs),
        "f1_macro": sum(f1s) / len(f1s),
    }


def quality(session: Session, caller: Caller, project: str, name: str, *, window_s: int) -> QualityRead:
    dep = read_deployment(session, caller, project, name)
    return quality_for(session, dep.name, window_s=window_s)


def quality_for(session: Session, deployment: str, *, window_s: int) -> QualityRead:
    since = utcnow() - timedelta(seconds=window_s)
    rows = session.execute(
        select(tables.Feedback.version, tables.Feedback.predicted, tables.Feedback.label).where(
            tables.Feedback.deployment == deployment, tables.Feedback.at >= since
        )
    ).all()
    overall = quality_of([(p, y) for _, p, y in rows])
    by_version: dict[str, list[tuple[Any, Any]]] = {}
    for version, p, y in rows:
        by_version.setdefault(version, []).append((p, y))
    return QualityRead(
        deployment=deployment,
        window_s=window_s,
        **overall,
        by_version={v: {k: x for k, x in quality_of(pairs).items() if k != "task"} for v, pairs in by_version.items()},
    )


def deployments_with_feedback(session: Session) -> list[str]:
    return list(session.scalars(select(tables.Feedback.deployment).distinct()))


# Retraining -----------------------------------------------------------------------------------


def create_retraining(
    session: Session,
    registry: Registry,
    dep: tables.Deployment,
    *,
    trigger: str,
    drift_report_id: int | None = None,
    caller: Caller | None = None,
    asked: Champion | None = None,
) -> tables.Retraining:
    """Queue a training job like the one that made the champion, on the policy's dataset version."""
    busy = session.scalar(
        select(tables.Retraining).where(
            tables.Retraining.deployment == dep.name, tables.Retraining.state.in_(ACTIVE_RETRAINING)
        )
    )
    if busy is not None:
        raise Conflict(f"Retraining {busy.id} of {dep.name!r} is still {busy.state}; wait for it to finish.")
    if dep.target.get("kind") == "split":
        raise InvalidInput(f"Deployment {dep.name!r} splits traffic; retraining needs one champion (alias or version).")
    policy = policy_of(dep) or RetrainPolicy()
    version, old = champion(session, registry, dep, asked)
    dataset = old.dataset_version.dataset
    query = select(tables.DatasetVersion).where(tables.DatasetVersion.dataset_id == dataset.id)
    if policy.dataset == "latest":
        data = session.scalar(query.order_by(tables.DatasetVersion.version.desc()).limit(1))
    else:
        data = session.scalar(query.where(tables.DatasetVersion.version == policy.dataset))
    if data is None:
        raise InvalidInput(f"Dataset {dataset.name!r} has no version {policy.dataset}; fix the retraining policy.")
    spec = dict(old.spec) | {"promote_to": "none"}
    job = tables.Job(
        project_id=dep.project_id,
        dataset_version_id=data.id,
        spec=spec,
        state=JobState.queued.value,
        created_by=caller.key_id if caller else None,
    )
    session.add(job)
    session.flush()
    job_log(
        session,
        job.id,
        f"queued: retraining of deployment {dep.name} ({trigger}) on {dataset.name} v{data.version}; "
        f"champion is version {version}",
    )
    row = tables.Retraining(
        project_id=dep.project_id,
        deployment=dep.name,
        trigger=trigger,
        drift_report_id=drift_report_id,
        policy=policy.model_dump(),
        job_id=job.id,
        metric=str(spec["metric"]),
        champion_version=version,
    )
    session.add(row)
    session.flush()
    _audit(session, caller, dep, f"retraining {row.id} started ({trigger}): job {job.id}", 202)
    return row


def _audit(session: Session, caller: Caller | None, dep: tables.Deployment, what: str, status: int) -> None:
    audit.create_event(
        session,
        key_id=caller.key_id if caller else None,
        action=f"retrain {what}"[:200],
        project=dep.project.name,
        target=f"deployments/{dep.name}",
        status=status,
        request_id="",
    )


def advance_retrainings(session: Session) -> None:
    """Training jobs that ended move their retraining on: to evaluation, or to failed."""
    for row in session.scalars(select(tables.Retraining).where(tables.Retraining.state == "training")):
        job = session.get(tables.Job, row.job_id) if row.job_id else None
        if job is None:
            row.state, row.reason, row.finished_at = "failed", "the training job was deleted", utcnow()
        elif job.state == JobState.succeeded.value:
            row.state, row.challenger_version = "evaluating", job.model_version
        elif JobState(job.state).terminal:
            row.state, row.finished_at = "failed", utcnow()
            row.reason = f"the challenger's training job {job.id} {job.state}: {job.reason or 'no reason given'}"
    session.flush()


def unsubmitted_evaluations(session: Session) -> list[tables.Retraining]:
    return list(
        session.scalars(
            select(tables.Retraining).where(
                tables.Retraining.state == "evaluating", tables.Retraining.flow_run_id.is_(None)
            )
        )
    )


def _retraining(session: Session, caller: Caller, project: str, name: str, rid: int) -> tables.Retraining:
    dep = read_deployment(session, caller, project, name)
    row = session.get(tables.Retraining, rid)
    if row is None or row.deployment != dep.name or row.project_id != dep.project_id:
        raise NotFound(f"Retraining {rid} does not exist for deployment {name!r}.")
    return row


def evaluation_context(session: Session, caller: Caller, project: str, name: str, rid: int) -> EvaluationContext:
    row = _retraining(session, caller, project, name, rid)
    if row.state != "evaluating" or not row.challenger_version or not row.champion_version:
        raise Conflict(f"Retraining {rid} is {row.state}; only one being evaluated can be scored.")
    dep = read_deployment(session, caller, project, name)
    job = session.get(tables.Job, row.job_id) if row.job_id else None
    if job is None:
        raise Conflict(f"The challenger's job of retraining {rid} was deleted.")
    return EvaluationContext(
        retraining_id=row.id,
        project=project,
        deployment=name,
        registered_name=registered_name(project, dep.model_name),
        champion_version=row.champion_version,
        challenger_version=row.challenger_version,
        dataset=job.dataset_version.dataset.name,
        dataset_version=job.dataset_version.version,
        target=str(job.spec["target"]),
        task=str(job.spec["task"]),
        metric=str(job.spec["metric"]),
        test_size=float(job.spec["test_size"]),
        seed=int(job.spec["seed"]),
    )


def decide(
    session: Session,
    registry: Registry,
    caller: Caller,
    project: str,
    name: str,
    rid: int,
    body: EvaluationResult,
) -> tuple[tables.Retraining, bool]:
    """Promote and redeploy the challenger only if it beats the champion by the policy's margin."""
    row = _retraining(session, caller, project, name, rid)
    if row.state != "evaluating":
        raise Conflict(f"Retraining {rid} is already {row.state}.")
    dep = read_deployment(session, caller, project, name)
    # Read before the first change: that query's autoflush would start the write (and take SQLite's
    # lock) before MLflow moves the alias below.
    job = session.get(tables.Job, row.job_id) if row.job_id else None
    row.finished_at = utcnow()
    if body.error or body.champion_score is None or body.challenger_score is None:
        row.state, row.reason = "failed", f"evaluation failed: {body.error or 'no scores'}"
        _audit(session, None, dep, f"{row.id} failed: {row.reason}", 500)
        return row, False
    row.champion_score, row.challenger_score = body.champion_score, body.challenger_score
    maximise = bool(job.spec.get("maximise", True)) if job is not None else True
    margin = float(row.policy.get("min_improvement", 0.0))
    gain = body.challenger_score - body.champion_score
    gain = gain if maximise else -gain
    what = f"{row.metric} {body.challenger_score:.4f} (challenger v{row.challenger_version}) vs " + (
        f"{body.champion_score:.4f} (champion v{row.champion_version}) on {body.rows} held-out rows"
    )
    if gain <= 0 or gain < margin:
        row.state = "kept"
        row.reason = f"not promoted: {what}; the gain {gain:+.4f} is below the required {margin:g}" + (
            "" if gain > 0 else " (the challenger is not better)"
        )
        _audit(session, None, dep, f"{row.id} kept v{row.champion_version}", 200)
        return row, False
    target = dep.target
    assert row.challenger_version is not None
    if target.get("kind") == "alias":
        alias = str(target["alias"])
        if alias in STAGES:
            registry.promote(project, dep.model_name, row.challenger_version, alias)
        else:
            registry.client.set_registered_model_alias(
                registered_name(project, dep.model_name), alias, row.challenger_version
            )
        how = f"alias {alias!r} moved to v{row.challenger_version}"
    else:
        dep.previous_target = target
        dep.target = {"kind": "version", "version": row.challenger_version} | (
            {"shadow": target["shadow"]} if target.get("shadow") else {}
        )
        how = f"deployment now serves v{row.challenger_version}"
    dep.updated_at = utcnow()
    session.add(
        tables.DeploymentEvent(
            project_id=dep.project_id, deployment=dep.name, action=f"retrain {row.id}", target=dep.target
        )
    )
    row.state, row.promoted = "promoted", True
    row.reason = f"promoted: {what}; gain {gain:+.4f} ≥ {margin:g}; {how}"
    _audit(session, None, dep, f"{row.id} promoted v{row.challenger_version}", 200)
    session.flush()
    return row, True


def retrainings(session: Session, caller: Caller, project: str, name: str, *, limit: int) -> list[RetrainingRead]:
    dep = read_deployment(session, caller, project, name)
    rows = session.scalars(
        select(tables.Retraining)
        .where(tables.Retraining.deployment == dep.name, tables.Retraining.project_id == dep.project_id)
        .order_by(tables.Retraining.id.desc())
        .limit(limit)
    ).all()
    return [RetrainingRead.model_validate(r) for r in rows]


def due_retrainings(session: Session) -> list[tables.Deployment]:
    """Deployments whose retraining cron schedule has fired since their last retraining (or the policy's setting)."""
    from datetime import datetime

    from cronsim import CronSim

    now = utcnow()
    last = _last_by_deployment(session, tables.Retraining)
    due = []
    for dep in session.scalars(select(tables.Deployment).where(tables.Deployment.retrain_policy.is_not(None))):
        schedule = (dep.retrain_policy or {}).get("schedule")
        if not schedule:
            continue
        set_at = datetime.fromisoformat(str((dep.retrain_policy or {}).get("_since") or dep.updated_at.isoformat()))
        previous = last.get(dep.name)
        since = max(previous, set_at) if previous is not None else set_at
        if next(CronSim(schedule, since.astimezone(UTC).replace(tzinfo=None))) <= now.replace(tzinfo=None):
            due.append(dep)
    return due
