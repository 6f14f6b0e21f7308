"""Training jobs: validated at submit time against the dataset's stored profile, run by workers."""

from __future__ import annotations

import hashlib
import math
from datetime import timedelta
from typing import Any

import orjson
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from miniml.db import tables
from miniml.db.tables import utcnow
from miniml.domain.jobs import JobState, check_transition
from miniml.domain.names import check_name
from miniml.domain.roles import Role
from miniml.domain.tasks import DEFAULT_METRIC, METRICS, Task, detect_task, maximise
from miniml.domain.tenancy import Caller
from miniml.errors import Conflict, Forbidden, InvalidInput, NotFound
from miniml.schemas.jobs import (
    BatchCreate,
    ImportCreate,
    JobCreate,
    JobFinish,
    JobRead,
    Progress,
    TrialRead,
    TrialReport,
)
from miniml.services import datasets
from miniml.services.projects import read_project
from miniml.storage import ObjectStore
from miniml.tracking.registry import Registry, registered_name

ALL_FAMILIES = [
    "linear",
    "random_forest",
    "extra_trees",
    "hist_gradient_boosting",
    "lightgbm",
    "xgboost",
    "torch_mlp",
]
DEFAULT_MAX_TRIALS = 20


def default_timeout_s(rows: int, columns: int) -> float:
    """A job's time budget when it names neither budget: 60 s up to a million cells, growing with the
    square root of the size beyond (2,000,000 x 7 gets 224 s), an hour at most."""
    return float(min(3600, max(60, round(60 * math.sqrt(rows * columns / 1e6)))))


def _resolve_dataset(
    session: Session, store: ObjectStore, caller: Caller, project: str, body: JobCreate | BatchCreate | ImportCreate
) -> tables.DatasetVersion:
    uri = getattr(body, "dataset_uri", None)
    if uri:
        return datasets.read_version_by_uri(session, store, caller, project, uri)
    if not body.dataset:
        raise InvalidInput("Name the training data: 'dataset' (and optionally 'version'), or 'dataset_uri'.")
    try:
        if body.version is None:
            versions = datasets.list_versions(session, caller, project, body.dataset)
            if not versions:
                raise NotFound(f"Dataset {body.dataset!r} has no versions.")
            return versions[-1]
        return datasets.read_version(session, caller, project, body.dataset, body.version)
    except NotFound as exc:
        raise InvalidInput(f"{exc.detail} Upload it first, or pick an existing dataset version.") from None


def resolve_spec(version: tables.DatasetVersion, body: JobCreate) -> dict[str, Any]:
    """Check the request against the dataset's profile; return the full spec the worker runs."""
    profile = version.profile
    columns = {c["name"]: c for c in profile["columns"]}
    if body.target not in columns:
        raise InvalidInput(
            f"Target column {body.target!r} is not in {version.dataset.name} v{version.version}; "
            f"the columns are {', '.join(columns)}."
        )
    target = columns[body.target]
    rows = int(profile["rows"]) - int(target["null_count"])
    task = detect_task(target, rows) if body.task is Task.auto else body.task
    if task is Task.regression and target["kind"] != "numeric":
        raise InvalidInput(f"Target {body.target!r} is {target['kind']}, not numeric; regression needs numbers.")
    if target["kind"] in ("text", "datetime"):
        raise InvalidInput(
            f"Target {body.target!r} is a {target['kind']} column with {target['distinct_count']} distinct values; "
            "pick a categorical or numeric target."
        )
    train_rows = int(rows * (1 - body.test_size))
    if train_rows < body.cv_folds * 2:
        raise InvalidInput(
            f"Too few rows: {rows} rows with a target leave {train_rows} for training, fewer than "
            f"{body.cv_folds * 2} needed for {body.cv_folds}-fold cross-validation. Add rows or lower cv_folds."
        )
    distinct = int(target["distinct_count"])
    if task is Task.regression and distinct < 2:
        raise InvalidInput(
            f"Target {body.target!r} has the same value in every row: there is nothing to learn "
            "(any model scores perfectly). Pick a target that varies."
        )
    if task is Task.classification:
        if distinct < 2:
            raise InvalidInput(f"Target {body.target!r} has only one class; classification needs at least two.")
        if distinct * 2 > rows:
            raise InvalidInput(
                f"Target {body.target!r} has {distinct} classes in {rows} rows: most rows are a class of their "
                "own, so nothing can be learnt about them. Pick task 'regression' for a numeric target, or a "
                "target with fewer classes."
            )
        counts = {str(t["value"]): int(t["count"]) for t in target.get("top", [])}
        if counts and len(counts) == int(target["distinct_count"]):
            label, smallest = min(counts.items(), key=lambda kv: kv[1])
            if int(smallest * (1 - body.test_size)) < body.cv_folds:
                raise InvalidInput(
                    f"Class {label!r} has only {smallest} rows; each class needs at least "
                    f"{int(body.cv_folds / (1 - body.test_size)) + 1} for {body.cv_folds}-fold cross-validation."
                )
    metric = body.metric or DEFAULT_METRIC[task]
    if metric not in METRICS:
        raise InvalidInput(f"Unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")
    if METRICS[metric][0] is not task:
        fitting = [m for m, (t, _) in METRICS.items() if t is task]
        raise InvalidInput(
            f"Metric {metric!r} is for {METRICS[metric][0].value}; for {task.value} use {', '.join(fitting)}."
        )
    families = body.families if body.families is not None else ALL_FAMILIES
    unknown = [f for f in families if f not in ALL_FAMILIES]
    if unknown or not families:
        raise InvalidInput(f"Unknown model families {unknown or '[] (empty)'}; choose from {', '.join(ALL_FAMILIES)}.")
    if body.max_trials is not None and body.max_trials <= 0:
        if body.timeout_s is None:
            raise InvalidInput("max_trials must be at least 1, or leave it out and set timeout_s.")
        max_trials = None
    else:
        max_trials = (
            body.max_trials if body.max_trials is not None else (None if body.timeout_s else DEFAULT_MAX_TRIALS)
        )
    timeout_s = body.timeout_s
    if timeout_s is None and body.max_trials is None:
        # Neither budget named: 20 trials or a time that fits the data, whichever ends first.
        timeout_s = default_timeout_s(int(profile["rows"]), len(columns))
    model_name = check_name(body.model_name or version.dataset.name, what="Model")
    if body.reproducible and body.parallelism > 1:
        raise InvalidInput(
            f"reproducible runs the trials one at a time on one worker, but parallelism is {body.parallelism}: "
            "set parallelism to 1, or leave reproducible out."
        )
    return {
        "target": body.target,
        "task": task.value,
        "metric": metric,
        "maximise": maximise(metric),
        "families": list(dict.fromkeys(families)),
        "max_trials": max_trials,
        "timeout_s": timeout_s,
        "test_size": body.test_size,
        "cv_folds": body.cv_folds,
        "seed": body.seed,
        "promote_to": body.promote_to,
        "model_name": model_name,
        "parallelism": body.parallelism,
        "reproducible": body.reproducible,
        "resources": body.resources.model_dump() if body.resources else None,
    }


def create_job(
    session: Session,
    store: ObjectStore,
    caller: Caller,
    project: str,
    body: JobCreate,
    *,
    idempotency_key: str | None = None,
) -> tuple[tables.Job, bool]:
    proj = read_project(session, caller, project)
    # The request a key stands for (IETF idempotency-key draft): a replay must carry the same body.
    fingerprint = hashlib.sha256(orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()
    if idempotency_key:
        same = session.scalar(
            select(tables.Job).where(tables.Job.project_id == proj.id, tables.Job.idempotency_key == idempotency_key)
        )
        if same is not None:
            return _replay(same, idempotency_key, fingerprint), False
    if body.promote_to == "production" and not caller.role.allows(Role.admin):
        raise Forbidden("Only an admin may promote to production; use promote_to 'staging' or 'none'.")
    version = _resolve_dataset(session, store, caller, project, body)
    spec = resolve_spec(version, body)
    job = tables.Job(
        project_id=proj.id,
        dataset_version_id=version.id,
        spec={**spec, "request_sha256": fingerprint} if idempotency_key else spec,
        state=JobState.queued.value,
        idempotency_key=idempotency_key,
        created_by=caller.key_id,
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:  # the same key raced in from a retry
        again = session.scalar(
            select(tables.Job).where(tables.Job.project_id == proj.id, tables.Job.idempotency_key == idempotency_key)
        )
        if again is None:
            raise
        return _replay(again, idempotency_key, fingerprint), False
    log(
        session, job.id, f"queued: {spec['task']} on {version.dataset.name} v{version.version}, target {spec['target']}"
    )
    return job, True


def _replay(job: tables.Job, key: str | None, fingerprint: str) -> tables.Job:
    if job.spec.get("request_sha256", fingerprint) != fingerprint:
        raise InvalidInput(
            f"Idempotency-Key {key!r} was used for job {job.id} with another body; send that body again "
            "to get the job back, or use a new key for a new job."
        )
    return job


def read_job(session: Session, caller: Caller, project: str, job_id: int) -> tables.Job:
    proj = read_project(session, caller, project)
    job = session.get(tables.Job, job_id)
    if job is None or job.project_id != proj.id:
        raise NotFound(f"Job {job_id} does not exist in project {project!r}.")
    return job


def list_jobs(session: Session, caller: Caller, project: str, *, state: JobState | None = None) -> list[tables.Job]:
    proj = read_project(session, caller, project)
    query = select(tables.Job).where(tables.Job.project_id == proj.id).order_by(tables.Job.id.desc())
    if state is not None:
        query = query.where(tables.Job.state == state.value)
    return list(session.scalars(query))


def trials_of(session: Session, job: tables.Job) -> list[tables.JobTrial]:
    return list(session.scalars(select(tables.JobTrial).where(tables.JobTrial.job_id == job.id)))


def to_read(session: Session, job: tables.Job, *, mlflow_ui: str | None = None, leaderboard: bool = True) -> JobRead:
    trials = trials_of(session, job) if leaderboard else []
    sign = -1.0 if job.spec.get("maximise", True) else 1.0
    ranked = sorted(trials, key=lambda t: (t.score is None, sign * (t.score or 0.0), t.number))
    end = job.finished_at or utcnow()
    url = None
    if job.mlflow_run_id and mlflow_ui:
        url = f"{mlflow_ui.rstrip('/')}/#/runs/{job.mlflow_run_id}"
    return JobRead(
        id=job.id,
        kind=job.kind,
        output=job.output,
        project=job.project.name,
        state=JobState(job.state),
        reason=job.reason,
        dataset=job.dataset_version.dataset.name,
        dataset_version=job.dataset_version.version,
        spec=job.spec,
        progress=Progress(
            trials_done=job.trials_done,
            trials_claimed=job.trials_claimed,
            trials_total=job.spec.get("max_trials"),
            best_score=job.best_score,
            best_family=job.best_family,
            elapsed_s=(end - job.started_at).total_seconds() if job.started_at else None,
        ),
        leaderboard=[TrialRead.model_validate(t) for t in ranked],
        test_metrics=job.test_metrics,
        mlflow_run_id=job.mlflow_run_id,
        mlflow_run_url=url,
        model_name=job.model_name,
        model_version=job.model_version,
        worker=job.worker,
        flow_run_id=job.flow_run_id,
        cancel_requested=job.cancel_requested,
        created_at=job.created_at,
        created_by=job.created_by,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def log(session: Session, job_id: int, message: str, level: str = "info") -> None:
    session.add(tables.JobLog(job_id=job_id, message=message[:4000], level=level))


def list_logs(session: Session, job: tables.Job, *, after: int = 0) -> list[tables.JobLog]:
    query = select(tables.JobLog).where(tables.JobLog.job_id == job.id, tables.JobLog.id > after)
    return list(session.scalars(query.order_by(tables.JobLog.id)))


def _move(session: Session, job: tables.Job, new: JobState, reason: str | None = None) -> None:
    check_transition(job.id, JobState(job.state), new)
    job.state = new.value
    if reason:
        job.reason = reason
    if new is JobState.running:
        job.started_at = utcnow()
        job.heartbeat_at = job.started_at
    if new.terminal:
        job.finished_at = utcnow()
        # Its MLflow runs are ended to match by the api's supervisor (durably: a restart keeps it).
        job.runs_open = job.mlflow_run_id is not None
    log(
        session,
        job.id,
        f"{new.value}" + (f": {reason}" if reason else ""),
        "error" if new is JobState.failed else "info",
    )
    session.flush()


def cancel_job(session: Session, job: tables.Job) -> tables.Job:
    state = JobState(job.state)
    if state.terminal:
        raise Conflict(f"Job {job.id} already {state.value}; there is nothing to cancel.")
    job.cancel_requested = True
    if state is JobState.queued:
        _move(session, job, JobState.cancelled, "cancelled before it started")
    else:
        log(session, job.id, "cancel requested; the worker stops the job's trials at its next heartbeat")
    session.flush()
    return job


def start_job(session: Session, job: tables.Job, worker: str, *, shard: int = 0) -> tables.Job:
    """A worker takes one shard of the job. The first shard to arrive, whichever it is, starts the
    job; the others join it while it runs. Each shard starts once (a second start is a 409: no job
    or shard runs twice), except that the worker already running the job may say so again."""
    if job.state == JobState.running.value and job.worker == worker:
        return job
    shards = int(job.spec.get("parallelism", 1))
    if shard >= shards:
        raise Conflict(f"Job {job.id} has no shard {shard}: it runs as {shards} shard(s), numbered from 0.")
    bit = 1 << shard
    # Conditional updates: two workers racing for one queued job, or one shard, cannot both win.
    result = session.execute(
        update(tables.Job)
        .where(tables.Job.id == job.id, tables.Job.state == JobState.queued.value)
        .values(
            state=JobState.running.value, worker=worker, started_at=utcnow(), heartbeat_at=utcnow(), shards_started=bit
        )
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        session.refresh(job)
        log(session, job.id, f"running on {worker}" + (f" (shard {shard})" if shard else ""))
        return job
    result = session.execute(
        update(tables.Job)
        .where(
            tables.Job.id == job.id,
            tables.Job.state == JobState.running.value,
            tables.Job.cancel_requested.is_(False),
            tables.Job.shards_started.op("&")(bit) == 0,
        )
        .values(shards_started=tables.Job.shards_started.op("|")(bit))
    )
    session.refresh(job)
    if result.rowcount == 1:  # type: ignore[attr-defined]
        log(session, job.id, f"shard {shard} joined on {worker}")
        return job
    raise Conflict(f"Job {job.id} is {job.state}; it cannot be started again.")


def heartbeat(session: Session, job: tables.Job) -> tables.Job:
    if job.state == JobState.running.value:
        job.heartbeat_at = utcnow()
        session.flush()
    return job


def claim_trial(session: Session, job: tables.Job) -> bool:
    """Reserve one trial of the budget, atomically across every worker of the job."""
    if job.state != JobState.running.value or job.cancel_requested:
        return False
    budget = job.spec.get("max_trials")
    query = update(tables.Job).where(tables.Job.id == job.id, tables.Job.state == JobState.running.value)
    if budget is not None:
        query = query.where(tables.Job.trials_claimed < budget)
    result = session.execute(query.values(trials_claimed=tables.Job.trials_claimed + 1, heartbeat_at=utcnow()))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def record_trial(session: Session, job: tables.Job, report: TrialReport) -> tables.Job:
    if session.get(tables.JobTrial, (job.id, report.number)) is None:
        session.add(tables.JobTrial(job_id=job.id, **report.model_dump()))
        session.flush()
    done = session.scalar(select(func.count()).select_from(tables.JobTrial).where(tables.JobTrial.job_id == job.id))
    job.trials_done = int(done or 0)
    better = job.best_score is None or (
        report.score is not None
        and (report.score > job.best_score if job.spec["maximise"] else report.score < job.best_score)
    )
    if report.state == "complete" and report.score is not None and better:
        job.best_score, job.best_family = report.score, report.family
    job.heartbeat_at = utcnow()
    session.flush()
    return job


def claim_finalize(session: Session, job: tables.Job, worker: str) -> bool:
    """Exactly one worker of a job refits and registers the best model."""
    if job.finalizer == worker:
        return True
    result = session.execute(
        update(tables.Job).where(tables.Job.id == job.id, tables.Job.finalizer.is_(None)).values(finalizer=worker)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def check_run_is_for_job(run: Any, project: str, job_id: int) -> None:
    """A job takes only the MLflow run the platform opened for it (tags set by the worker's tracker)."""
    tags = dict(run.data.tags) if run is not None else {}
    if tags.get("miniml.project") != project or tags.get("miniml.job_id") != str(job_id):
        raise InvalidInput(
            f"MLflow run {'is unknown' if run is None else run.info.run_id + ' was not opened for this job'}: "
            f"job {job_id} of project {project!r} takes only the parent run the platform opened for it."
        )


def set_run(session: Session, job: tables.Job, run_id: str) -> tables.Job:
    """The first shard to open a parent run wins; later ones get the winner's id back."""
    if job.mlflow_run_id is None:
        job.mlflow_run_id = run_id
    session.flush()
    return job


def finish_job(session: Session, job: tables.Job, body: JobFinish) -> tables.Job:
    if job.state == body.state:  # a retried report
        return job
    job.test_metrics = body.test_metrics
    job.model_name = body.model_name
    job.model_version = body.model_version
    job.output = body.output
    _move(session, job, JobState(body.state), body.reason)
    return job


def reap_stale_jobs(session: Session, *, timeout_s: float) -> list[tuple[int, str | None, JobState]]:
    """End running jobs whose worker stopped sending heartbeats (killed, lost, out of memory): failed,
    or cancelled when a cancel was asked for. Return each with its MLflow parent run and the state it
    ended in; the caller ends the runs to match."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stale = list(
        session.scalars(
            select(tables.Job).where(tables.Job.state == JobState.running.value, tables.Job.heartbeat_at < cutoff)
        )
    )
    silent = f"sent no heartbeat for {timeout_s:.0f}s (it died or was killed)"
    for job in stale:
        if job.cancel_requested:  # what was asked for happened: nothing runs the job any more
            _move(session, job, JobState.cancelled, f"cancelled by request; worker {job.worker} {silent}")
        else:
            _move(session, job, JobState.failed, f"worker {job.worker} {silent}")
    return [(j.id, j.mlflow_run_id, JobState(j.state)) for j in stale]


def unsubmitted_jobs(session: Session) -> list[tables.Job]:
    return list(
        session.scalars(
            select(tables.Job).where(tables.Job.state == JobState.queued.value, tables.Job.flow_run_id.is_(None))
        )
    )


def mark_submitted(session: Session, job_id: int, flow_run_id: str) -> None:
    job = session.get(tables.Job, job_id)
    if job is not None and job.flow_run_id is None:  # another api process may have submitted it first
        job.flow_run_id = flow_run_id
        job.submitted_at = utcnow()
        log(session, job_id, f"submitted to Prefect as flow run {flow_run_id}")
        session.flush()


def _queue_one_step_job(
    session: Session,
    caller: Caller,
    proj: tables.Project,
    data: tables.DatasetVersion,
    kind: str,
    spec: dict[str, Any],
) -> tables.Job:
    """A job a worker runs in one step (no trials): batch predictions, a model import."""
    full = {"kind": kind, **spec, "parallelism": 1, "max_trials": None, "maximise": True}
    job = tables.Job(
        project_id=proj.id,
        dataset_version_id=data.id,
        spec=full,
        state=JobState.queued.value,
        kind=kind,
        created_by=caller.key_id,
    )
    session.add(job)
    session.flush()
    return job


def create_batch_job(
    session: Session,
    store: ObjectStore,
    registry: Registry,
    caller: Caller,
    project: str,
    deployment: str,
    body: BatchCreate,
) -> tables.Job:
    """Predictions for a whole dataset version with a deployment's model, run by a worker like a job."""
    from miniml.services import deployments

    proj = read_project(session, caller, project)
    dep = deployments.read_deployment(session, caller, project, deployment)
    variants = deployments.resolve(registry, project, dep.model_name, dep.target)
    version = max(variants, key=lambda v: v.weight).version
    data = _resolve_dataset(session, store, caller, project, body)
    columns = {c["name"] for c in data.profile["columns"]}
    needed = registry.input_columns(project, dep.model_name, version)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InvalidInput(
            f"{data.dataset.name} v{data.version} lacks column(s) {', '.join(missing)} that {dep.model_name} v{version} needs."
        )
    output = check_name(body.output_name or f"{data.dataset.name}-predictions", what="Dataset")
    spec = {
        "deployment": dep.name,
        "registered_name": registered_name(project, dep.model_name),
        "model_version": version,
        "output_dataset": output,
    }
    job = _queue_one_step_job(session, caller, proj, data, "batch", spec)
    log(
        session,
        job.id,
        f"queued: batch predictions of {data.dataset.name} v{data.version} with {dep.model_name} v{version}",
    )
    return job


def create_import_job(
    session: Session, store: ObjectStore, caller: Caller, project: str, model: str, body: ImportCreate, *, key: str
) -> tables.Job:
    """A model built elsewhere, stored at ``key``: a worker checks it against the allowlist, then
    registers and signs it (only workers hold the signing key)."""
    proj = read_project(session, caller, project)
    check_name(model, what="Model")
    data = _resolve_dataset(session, store, caller, project, body)
    columns = [c["name"] for c in data.profile["columns"]]
    if body.target is not None and body.target not in columns:
        raise InvalidInput(
            f"Column {body.target!r} is not in {data.dataset.name} v{data.version}; it has {', '.join(columns)}."
        )
    spec = {
        "object": key,
        "model_name": model,
        "registered_name": registered_name(project, model),
        "target": body.target,
    }
    job = _queue_one_step_job(session, caller, proj, data, "import", spec)
    log(session, job.id, f"queued: import of {model} with the columns of {data.dataset.name} v{data.version}")
    return job


def jobs_with_open_runs(session: Session, *, limit: int = 50) -> list[tuple[int, str, str]]:
    """Ended jobs whose MLflow runs may still be open: (id, run id, state), oldest first."""
    rows = session.execute(
        select(tables.Job.id, tables.Job.mlflow_run_id, tables.Job.state)
        .where(tables.Job.runs_open.is_(True), tables.Job.mlflow_run_id.is_not(None))
        .order_by(tables.Job.id)
        .limit(limit)
    ).all()
    return [(int(i), str(r), str(st)) for i, r, st in rows]


def runs_closed(session: Session, job_id: int) -> None:
    job = session.get(tables.Job, job_id)
    if job is not None:
        job.runs_open = False
        session.flush()
