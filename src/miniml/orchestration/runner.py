"""Runs one training job (or one shard of it) for a worker, reporting everything through the api.

The runner talks to three things: the api (through the SDK) for the job, its data and its state;
Optuna's storage (the metadata DB) for the shared study; MLflow (through ``tracking``) for runs
and the registry. It holds no state of its own: a restarted worker starts from the api's view.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pyarrow as pa

from miniml.config import Settings
from miniml.cores import available_cores
from miniml.data.formats import FileFormat, TableFile
from miniml.domain.tasks import Task
from miniml.errors import Conflict, InvalidInput, MiniMLError, NotFound, public_reason
from miniml.orchestration.trainer import GO, Trainer, TrainRequest
from miniml.schemas.jobs import JobFinish, JobRead, TrialReport
from miniml.sdk.client import Client
from miniml.tracking.registry import registered_name
from miniml.tracking.runs import Tracker
from miniml.tracking.signing import load_verified, signing_key
from miniml.training import plots
from miniml.training.data import Features, Split, features_from_profile, load_frame, split
from miniml.training.families import FAMILIES
from miniml.training.search import (
    PROMOTED,
    Cancelled,
    LastRung,
    Promoted,
    SearchControl,
    SearchSpec,
    TrialResult,
    affordable_best,
    best_trial,
    end_running_trials,
    fit_cost,
    holdout,
    make_storage,
    promote,
    promotion_rows,
    refit,
    run_search,
    sampled,
    trial_rows_for,
)

log = logging.getLogger("miniml.worker")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    """Tells the api the job is alive every few seconds, and learns about cancel requests and about
    the job ending elsewhere (the api ended it while this worker could not reach it)."""

    def __init__(self, client: Client, project: str, job_id: int, every_s: float) -> None:
        self.client, self.project, self.job_id, self.every_s = client, project, job_id, every_s
        self.cancelled = threading.Event()
        self.ended = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                status = self.client.job_reports.heartbeat(self.project, self.job_id)
            except MiniMLError as exc:
                log.warning("heartbeat failed", extra={"job_id": self.job_id, "error": exc.detail})
                continue
            if status.cancel_requested:
                self.cancelled.set()
            if status.state.terminal:
                self.ended.set()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _table(job_file: Path, version: Any) -> TableFile:
    types: dict[str, pa.DataType] = {}
    for col in version.profile["columns"]:
        try:
            types[col["name"]] = pa.type_for_alias(col["arrow_type"])
        except ValueError:
            continue  # Arrow infers it again (e.g. timestamps)
    return TableFile(path=job_file, format=FileFormat(version.format), delimiter=version.delimiter, column_types=types)


def trial_threads(settings: Settings, spec: dict[str, Any]) -> int:
    """Trials side by side for this job: one for a reproducible job (each on every core), else the
    worker's setting (0: one per core)."""
    return 1 if spec.get("reproducible") else settings.worker.trial_threads


def run_job(
    client: Client, settings: Settings, job_id: int, project: str, *, shard: int = 0, created: float | None = None
) -> JobRead | None:
    """Run a job to its end; return the final job, or None when another worker has it.

    ``created`` (the job's creation time, sent with the flow run) tells a flow run of this job from
    a stale one left in Prefect's queue by an earlier database or another platform on the same
    Prefect, whose job id may now name a different job: such a run does nothing.
    """
    reports = client.job_reports
    worker = worker_name()
    if created is not None and not _is_this_job(client, project, job_id, created):
        return None
    try:
        reports.start(project, job_id, worker, shard=shard)
    except Conflict as exc:
        log.info("job taken or ended elsewhere", extra={"job_id": job_id, "detail": exc.detail})
        return None
    tracker = Tracker(settings.mlflow_uri)
    run_id: str | None = None
    trainer: Trainer | None = None
    with Heartbeat(client, project, job_id, settings.worker.heartbeat_s) as beat, contextlib.ExitStack() as stack:
        try:
            job = client.jobs.get(project, job_id)
            if job.kind == "batch":
                return _batch(client, settings, job)
            if job.kind == "import":
                run_id = _ensure_run(client, tracker, job, shard)
                return _import(client, settings, tracker, job, run_id)
            _check_gpus(client, job, worker)
            # Started first: the child's imports overlap the parent run's creation.
            trainer = stack.enter_context(
                Trainer(
                    job_id, trial_threads=trial_threads(settings, job.spec), platform=str(settings.data_dir.resolve())
                )
            )
            run_id = _ensure_run(client, tracker, job, shard)
            return _supervise(client, settings, tracker, job, run_id, worker, beat, shard, trainer)
        except Exception as exc:
            # The user sees the reason; the traceback stays in the worker's own log.
            reason = public_reason(exc)
            log.error("job failed", extra={"job_id": job_id, "trace": traceback.format_exc()[-4000:]})
            if trainer is not None:  # nothing of the job may run on once it is reported failed
                trainer.stop()
                _end_own_trials(settings, job_id, worker, optuna.trial.TrialState.FAIL, f"stopped: {reason}"[:400])
            try:
                reports.log(project, job_id, f"failed: {reason} (the worker's log has the details)", level="error")
                if run_id:
                    _end_runs(tracker, run_id, "FAILED", job_id)
                return reports.finish(project, job_id, JobFinish(state="failed", reason=reason[:3900]))
            except (MiniMLError, Conflict):
                return None


# Seconds kept for logging and registering the model after the final fit.
REGISTER_S = 3.0


def overrun_end(began: float, budget: float | None) -> float:
    """When a job's final fit must end: the budget, plus a tenth of it (30 s at most) for a model
    that became the best late (a trial, or the last rung's winner) rather than a much weaker one."""
    return began + budget + min(30.0, budget / 10) if budget else math.inf


def _last_rung(
    reports: Any,
    project: str,
    job_id: int,
    study: optuna.Study,
    data: Split,
    features: Features,
    search: SearchSpec,
    best: optuna.trial.FrozenTrial,
    began: float,
    budget: float | None,
) -> tuple[optuna.trial.FrozenTrial, LastRung]:
    """Trials fit on a sample: rank the best few (and each grown) on more rows (``search.promote``)
    and keep the winner there."""
    end = began + budget if budget else math.inf
    rows = len(data.x_train) + len(data.x_test)
    started = time.monotonic()
    rung = promote(study, data, features, search, end=end, final_rows=rows, final_end=overrun_end(began, budget))
    took = time.monotonic() - started
    if not rung.ranked:
        return best, rung

    def name(p: Promoted) -> str:
        if p.trial is not None:
            return f"trial {p.trial.number}"
        return f"trial {p.base.number if p.base is not None else best.number} grown"

    scores = ", ".join(f"{name(p)} ({p.params['family']}) {p.score:.4f} in {p.fit_s:.1f}s" for p in rung.ranked)
    message = (
        f"last rung ({took:.0f}s): {rung.fit_rows:,} rows each, ranked on {rung.valid_rows:,} training rows no "
        f"trial saw: {scores}"
    )
    winner = rung.winner
    if winner is None or winner.number == best.number:
        reports.log(project, job_id, message)
        return best, rung
    grown_from = winner.user_attrs.get("grown_from")
    what = f"trial {winner.number}" + (f" (trial {grown_from} grown)" if grown_from is not None else "")
    reports.log(project, job_id, f"{message}; {what} goes on to the final fit")
    return winner, rung


def _check_gpus(client: Client, job: JobRead, worker: str) -> None:
    """A job that asks for GPUs fails at once where there are fewer; say where the MLP will train."""
    from miniml.monitoring.gpu import visible_gpus

    wanted = int((job.spec.get("resources") or {}).get("gpu") or 0)
    found = visible_gpus()
    if wanted > len(found):
        raise InvalidInput(
            f"The job asks for {wanted} GPU(s) and worker {worker} sees {len(found)}. Run it on a Kubernetes work "
            "pool with GPU nodes (docs/operations.md), or leave resources.gpu out to train on the CPU."
        )
    if found and "torch_mlp" in job.spec.get("families", []):
        client.job_reports.log(job.project, job.id, f"torch_mlp trains on CUDA: {', '.join(found)}")


def _is_this_job(client: Client, project: str, job_id: int, created: float) -> bool:
    try:
        job = client.jobs.get(project, job_id)
    except NotFound:
        job = None
    if job is not None and abs(job.created_at.timestamp() - created) < 0.001:
        return True
    log.warning(
        "flow run for a job this platform does not have; skipped",
        extra={"job_id": job_id, "project": project, "job_created": created},
    )
    return False


def _ensure_run(client: Client, tracker: Tracker, job: JobRead, shard: int) -> str:
    """Open the job's MLflow parent run; whichever shard gets there first wins, the others use its run.

    No shard waits for another: a shard that waited for shard 0 would hold a worker slot that
    shard 0 might need.
    """
    if job.mlflow_run_id:
        return job.mlflow_run_id
    version = client.datasets.version(job.project, job.dataset, job.dataset_version)
    run_id = tracker.start_job_run(
        job.project,
        job.id,
        {
            "miniml.dataset": job.dataset,
            "miniml.dataset_version": str(job.dataset_version),
            "miniml.dataset_sha256": version.sha256,
            "miniml.target": str(job.spec["target"]),
        },
    )
    winner = client.job_reports.set_run(job.project, job.id, run_id).mlflow_run_id or run_id
    if winner != run_id:
        tracker.client.delete_run(run_id)
    return winner


def _supervise(
    client: Client,
    settings: Settings,
    tracker: Tracker,
    job: JobRead,
    run_id: str,
    worker: str,
    beat: Heartbeat,
    shard: int,
    trainer: Trainer,
) -> JobRead | None:
    """Run the job in its trainer process; kill it the moment the heartbeat hears of a cancel."""
    trainer.send(
        TrainRequest(
            api_url=str(client.http.base_url),
            api_key=client.headers.get("X-API-Key"),
            settings=settings,
            job=job,
            run_id=run_id,
            worker=worker,
            shard=shard,
        )
    )
    committed = False
    while True:
        if not committed and (beat.cancelled.is_set() or beat.ended.is_set()):
            return _stop(client, settings, tracker, job, run_id, worker, beat, shard, trainer)
        message = trainer.receive(timeout=0.25)
        if message is None:
            continue
        match message[0]:
            case "commit":
                if beat.cancelled.is_set() or beat.ended.is_set():
                    return _stop(client, settings, tracker, job, run_id, worker, beat, shard, trainer)
                committed = True  # from here the model is being written: a cancel comes too late
                trainer.send(GO)
            case "done":
                done: JobRead | None = message[1]
                return done
            case "cancelled":
                beat.cancelled.set()
                return _stop(client, settings, tracker, job, run_id, worker, beat, shard, trainer)
            case "failed":
                raise MiniMLError(str(message[1]))
            case _:  # its pipe closed with no result: killed (often for memory) or crashed
                code = trainer.stop()
                why = " (killed; the out-of-memory killer does that)" if code == -signal.SIGKILL else ""
                raise MiniMLError(
                    f"The training process of job {job.id} ended with exit code {code}{why} before it reported "
                    "a result. Try fewer trial threads (worker.trial_threads) or a smaller dataset."
                )


def _stop(
    client: Client,
    settings: Settings,
    tracker: Tracker,
    job: JobRead,
    run_id: str,
    worker: str,
    beat: Heartbeat,
    shard: int,
    trainer: Trainer,
) -> JobRead:
    """Kill the job's trainer; settle what it left: its running trials, the MLflow runs, the job."""
    trainer.stop()
    project, reports = job.project, client.job_reports
    if not beat.cancelled.is_set():  # the api ended the job (no heartbeat for too long) and its runs
        _end_own_trials(settings, job.id, worker, optuna.trial.TrialState.FAIL, "stopped: the job ended elsewhere")
        log.warning("job ended elsewhere; its trials were stopped", extra={"job_id": job.id})
        return client.jobs.get(project, job.id)
    stopped = _end_own_trials(settings, job.id, worker, optuna.trial.TrialState.PRUNED, "cancelled mid-trial")
    experiment = tracker.experiment_id(project)
    for result in stopped:
        reports.trial(project, job.id, TrialReport(**result.__dict__))
        try:
            tracker.log_trial(run_id, experiment, result, job.spec["metric"])
        except Exception as exc:  # the job's end matters more than one trial's record
            log.warning("trial not logged to MLflow", extra={"job_id": job.id, "error": str(exc)[:200]})
    where = f"shard {shard} on {worker}" if int(job.spec.get("parallelism", 1)) > 1 else worker
    reports.log(project, job.id, f"cancel: {where} stopped {len(stopped)} running trial(s)")
    _end_runs(tracker, run_id, "KILLED", job.id)
    return reports.finish(project, job.id, JobFinish(state="cancelled", reason="cancelled by request"))


def _end_own_trials(
    settings: Settings, job_id: int, worker: str, state: optuna.trial.TrialState, reason: str
) -> list[TrialResult]:
    """The trials this worker's killed trainer left RUNNING in Optuna, ended with the reason.

    Optuna would fail them itself, but only once its heartbeat grace ran out, and with no reason.
    """
    try:
        storage = make_storage(settings.db_url)
    except Exception as exc:  # the job's end is reported all the same
        log.warning("trials left running in Optuna", extra={"job_id": job_id, "error": public_reason(exc)})
        return []
    try:
        return end_running_trials(
            storage,
            f"miniml-job-{job_id}",
            worker=worker,
            state=state,
            reason=reason,
            unclaimed=state == optuna.trial.TrialState.PRUNED,  # a cancel stops every shard
        )
    except Exception as exc:
        log.warning("trials left running in Optuna", extra={"job_id": job_id, "error": public_reason(exc)})
        return []
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _end_runs(tracker: Tracker, run_id: str, status: str, job_id: int) -> None:
    """End the job's MLflow runs; MLflow being away does not change how the job ended (the api
    ends the runs once MLflow answers)."""
    try:
        tracker.finish(run_id, status)
    except Exception as exc:
        log.warning("MLflow runs left open for the api to end", extra={"job_id": job_id, "error": public_reason(exc)})


def train(
    client: Client,
    settings: Settings,
    tracker: Tracker,
    job: JobRead,
    run_id: str,
    worker: str,
    shard: int,
    *,
    commit: Callable[[], None],
) -> JobRead | None:
    """Search, refit and register: the job's work, run in its trainer process (``trainer.py``).

    ``commit`` is called once the refit model is ready and before anything of it is written: it
    returns when the runner allows the registration (it kills the process instead on a cancel).
    Raises ``Cancelled`` when the search ended for a cancel this process saw itself.
    """
    project, job_id, spec = job.project, job.id, job.spec
    reports = client.job_reports
    stop = threading.Event()
    began = time.monotonic()  # the time budget (timeout_s) counts from here, final fits included
    version = client.datasets.version(project, job.dataset, job.dataset_version)
    with tempfile.TemporaryDirectory(prefix=f"miniml-job-{job_id}-") as tmp:
        path = client.datasets.download(project, job.dataset, job.dataset_version, Path(tmp) / f"data.{version.format}")
        frame = load_frame(_table(path, version))
    task = Task(spec["task"])
    features = features_from_profile(version.profile, spec["target"])
    data = split(frame, features, spec["target"], task, test_size=spec["test_size"], seed=spec["seed"])
    for name, why in features.dropped.items():
        reports.log(project, job_id, f"column {name!r} left out: {why}")
    reports.log(
        project,
        job_id,
        f"shard {shard} on {worker}: {len(data.x_train)} training rows, {len(data.x_test)} held out, "
        f"{len(features.columns)} features, families {', '.join(spec['families'])}",
    )
    threads = trial_threads(settings, spec) or available_cores()
    budget: float | None = spec.get("timeout_s")
    # The search keeps the final fits' time back from the budget; a trial that became the best
    # late may still have its fits overrun it a little (a tenth, 30 s at most) rather than give way
    # to a much weaker model.
    final_end = overrun_end(began, budget)
    rows = len(data.x_train) + len(data.x_test)
    search = SearchSpec(
        task=task,
        metric=spec["metric"],
        families=spec["families"],
        cv_folds=spec["cv_folds"],
        seed=spec["seed"],
        max_trials=spec.get("max_trials"),
        timeout_s=max(0.0, budget - (time.monotonic() - began)) if budget else None,
        n_jobs=threads,
        shard=shard,
        final_fit_rows=len(data.x_train) + rows,  # the held-out model, then the one on every row
        trial_rows=trial_rows_for(budget),
    )
    promoted_rows, _ = promotion_rows(data, search)
    if promoted_rows:  # the last rung's fits; its winner's fit is the held-out model
        search.final_fit_rows = rows + PROMOTED * promoted_rows
    if sampled(data, search):
        reports.log(
            project,
            job_id,
            f"trials fit on a sample of {search.trial_rows} of the {len(data.x_train)} training rows "
            f"(a {budget:.0f}s budget); the final fit sees every row if the budget allows",
        )
    experiment = tracker.experiment_id(project)

    def on_trial(result: TrialResult) -> None:
        status = reports.trial(project, job_id, TrialReport(**result.__dict__))
        if status.cancel_requested or status.state.terminal:
            stop.set()
        try:
            tracker.log_trial(run_id, experiment, result, spec["metric"])
        except Exception as exc:  # a trial's MLflow record must not end the search
            log.warning("trial not logged to MLflow", extra={"job_id": job_id, "error": str(exc)[:200]})

    fair = FairShare(
        lambda: not stop.is_set() and reports.claim_trial(project, job_id),
        left=lambda: _trials_left(client, project, job_id, spec.get("max_trials")),
        budget=spec.get("max_trials"),
        shards=int(spec.get("parallelism", 1)),
        grace_s=settings.worker.shard_grace_s,
        stop=stop.is_set,
    )
    control = SearchControl(
        claim=fair,
        on_trial=on_trial,
        should_stop=stop.is_set,
        worker=worker,
    )
    storage = make_storage(settings.db_url)
    study_name = f"miniml-job-{job_id}"
    searched = time.monotonic()
    run_search(storage, study_name, data, features, search, control)
    if stop.is_set():
        raise Cancelled
    remaining = f"; {budget - (time.monotonic() - began):.0f}s of the budget left" if budget else ""
    reports.log(project, job_id, f"trials ended after {time.monotonic() - searched:.0f}s{remaining}")
    _wait_for_other_shards(client, project, job_id, spec)
    if not reports.finalize(project, job_id, worker):
        return None  # another shard refits and registers
    if client.job_reports.heartbeat(project, job_id).cancel_requested:
        raise Cancelled
    study = optuna.load_study(study_name=study_name, storage=storage)
    best = best_trial(study)
    if best is not None and budget:
        left = budget - (time.monotonic() - began)
        best, is_best = affordable_best(study, len(data.x_train), final_end - time.monotonic())
        if best is not None and not is_best:
            top = study.best_trial
            reports.log(
                project,
                job_id,
                f"the best trial, {top.number} ({top.params['family']}), would need about "
                f"{fit_cost(top, len(data.x_train)):.0f}s for its final fit and {max(0.0, left):.0f}s of the "
                f"budget are left: trial {best.number} ({best.params['family']}) is refit instead",
            )
    rung = LastRung(None, [], 0, 0)
    if best is not None and promoted_rows:
        best, rung = _last_rung(reports, project, job_id, study, data, features, search, best, began, budget)
    if best is None:
        errors = sorted({str(t.user_attrs.get("error")) for t in study.trials if t.user_attrs.get("error")})
        hint = f" within the time budget of {budget:.0f}s (raise timeout_s)" if budget else ""
        raise RuntimeError(f"no trial completed{hint}" + (f"; errors: {'; '.join(errors)[:1500]}" if errors else ""))
    if rung.pipe is not None:
        # The last rung fit the winner on part of the training split: the held-out rows score that fit.
        pipe, family = rung.pipe, FAMILIES[str(best.params["family"])]
        held_out_rows, final_s = rung.fit_rows, rung.final_s
        reports.log(
            project,
            job_id,
            f"best: trial {best.number} ({best.params['family']}), CV {spec['metric']} {best.value:.4f}; "
            f"scored on the held-out rows as the last rung fit it, on {held_out_rows:,} training rows",
        )
    else:
        reports.log(
            project,
            job_id,
            f"best: trial {best.number} ({best.params['family']}), CV {spec['metric']} {best.value:.4f}; refitting",
        )
        pipe, family = refit(best, data, features, search)
        held_out_rows, final_s = len(data.x_train), fit_cost(best, rows)
    metrics, predictions = holdout(pipe, data, task)
    figures = {
        "optimisation_history": plots.optimisation_history(study, spec["maximise"]),
        "parameter_importances": plots.parameter_importances(study),
        "feature_importances": plots.feature_importances(pipe),
        "confusion_matrix" if task is Task.classification else "residuals": (
            plots.confusion(data.y_test, predictions)
            if task is Task.classification
            else plots.residuals(data.y_test, predictions)
        ),
    }
    # The served model learns from every row: the test rows only measured the configuration. Under
    # a time budget with no time left for that fit, the held-out model is the one registered.
    left = budget - (time.monotonic() - began) if budget else math.inf
    # Short of time for every row, as many as the budget's end allows (rows cost alike), when that
    # is clearly more than the held-out model saw.
    affordable = int(rows * max(0.0, left - REGISTER_S - 1.0) / max(1e-9, final_s - 1.0)) if budget else rows
    tested = f"test {spec['metric']} {metrics.get(spec['metric'], float('nan')):.4f}"
    if final_s <= final_end - time.monotonic():
        reports.log(project, job_id, f"{tested}; final fit on all {rows} rows")
        pipe, family = refit(best, data, features, search, every_row=True)
    elif affordable >= held_out_rows * 1.5:
        reports.log(
            project,
            job_id,
            f"{tested}; the fit on every row would need about {final_s:.0f}s and {max(0.0, left):.0f}s of the budget "
            f"are left: final fit on {affordable} of the {rows} rows",
        )
        rows = affordable
        pipe, family = refit(best, data, features, search, every_row=True, rows=rows)
    else:
        rows = held_out_rows
        reports.log(
            project,
            job_id,
            f"{tested}; the fit on every row would need about {final_s:.0f}s and {max(0.0, left):.0f}s of the "
            f"budget are left: the model that learnt from {rows} training rows is registered",
        )
    commit()
    tracker.log_figures(run_id, figures)
    registered = registered_name(project, spec["model_name"])
    model_version = tracker.log_model(
        run_id,
        pipe,
        family,
        data.x_test.head(5),
        registered=registered,
        params={"family": family.name, "training_rows": rows, **best.params},
        metrics=metrics,
        signing_key=signing_key(settings.auth.model_signing_key, settings.data_dir),
    )
    if spec["promote_to"] != "none":
        tracker.set_alias(registered, spec["promote_to"], model_version)
    _end_runs(tracker, run_id, "FINISHED", job_id)
    reports.log(project, job_id, f"registered {registered} version {model_version}; test {metrics}")
    return reports.finish(
        project,
        job_id,
        JobFinish(state="succeeded", test_metrics=metrics, model_name=registered, model_version=model_version),
    )


def _batch(client: Client, settings: Settings, job: JobRead) -> JobRead:
    """Predict every row of a dataset version in record batches; upload the result as a new version."""
    import pyarrow.csv as pacsv

    from miniml.training.data import Features, coerce

    spec, project = job.spec, job.project
    reports = client.job_reports
    version = client.datasets.version(project, job.dataset, job.dataset_version)
    key = signing_key(settings.auth.model_signing_key, settings.data_dir)
    model, signature = load_verified(settings.mlflow_uri, spec["registered_name"], str(spec["model_version"]), key)
    inputs = signature.inputs.inputs if signature is not None and signature.inputs is not None else []
    numeric = {"double", "float", "long", "integer", "boolean"}
    features = Features(
        numeric=[str(c.name) for c in inputs if str(getattr(c.type, "name", c.type)).lower() in numeric],
        categorical=[str(c.name) for c in inputs if str(getattr(c.type, "name", c.type)).lower() not in numeric],
    )
    names = [str(c.name) for c in inputs]
    rows = 0
    with tempfile.TemporaryDirectory(prefix=f"miniml-batch-{job.id}-") as tmp:
        source = client.datasets.download(project, job.dataset, job.dataset_version, Path(tmp) / f"in.{version.format}")
        out_path = Path(tmp) / f"{spec['output_dataset']}.csv"
        writer, status = None, None
        for batch in _table(source, version).batches():
            frame = batch.to_pandas()
            predictions = model.predict(coerce(frame, features)[names])
            table = pa.Table.from_batches([batch]).append_column("prediction", pa.array(list(predictions)))
            if writer is None:
                writer = pacsv.CSVWriter(str(out_path), table.schema)
            writer.write_table(table)
            rows += batch.num_rows
            reports.log(project, job.id, f"{rows} rows predicted")
            status = reports.heartbeat(project, job.id)  # a cancel takes effect within one record batch
            if status.cancel_requested or status.state.terminal:
                break
        if writer is not None:
            writer.close()
        if status is not None and status.state.terminal:  # ended elsewhere (the api lost this worker)
            return client.jobs.get(project, job.id)
        if status is not None and status.cancel_requested:
            reports.log(project, job.id, f"cancel: stopped after {rows} rows; no dataset written")
            return reports.finish(project, job.id, JobFinish(state="cancelled", reason="cancelled by request"))
        written = client.datasets.upload(project, out_path, name=spec["output_dataset"])
    output = {"dataset": written.dataset, "version": written.version, "rows": rows, "uri": written.uri}
    reports.log(project, job.id, f"wrote {written.dataset} v{written.version} ({rows} rows)")
    return reports.finish(project, job.id, JobFinish(state="succeeded", output=output))


def _wait_for_other_shards(client: Client, project: str, job_id: int, spec: dict[str, Any]) -> None:
    """With several shards, refit only once every claimed trial has reported."""
    if int(spec.get("parallelism", 1)) <= 1:
        return
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        job = client.jobs.get(project, job_id)
        if job.state.terminal or job.progress.trials_done >= job.progress.trials_claimed or job.cancel_requested:
            return
        time.sleep(1)


class FairShare:
    """Trial claims of one shard of a parallel job.

    With P shards and a budget of B trials, a shard claims at most ceil(B / P) trials during its
    first ``grace_s`` seconds, so a shard whose process starts later still finds its share; after
    that it claims whatever is left, so a worker that never comes cannot strand the budget. A
    shard that has its share waits (polling) rather than claiming, and stops waiting as soon as the
    budget is used up.
    """

    def __init__(
        self,
        claim: Callable[[], bool],
        *,
        left: Callable[[], int | None],
        budget: int | None,
        shards: int,
        grace_s: float,
        stop: Callable[[], bool],
        poll_s: float = 1.0,
    ) -> None:
        self.claim, self.left, self.stop, self.poll_s = claim, left, stop, poll_s
        self.share = -(-budget // shards) if budget and shards > 1 else None
        self.deadline = time.monotonic() + grace_s
        self.mine = 0
        self.lock = threading.Lock()

    def __call__(self) -> bool:
        while self.share is not None and self.mine >= self.share and time.monotonic() < self.deadline:
            left = self.left()
            if self.stop() or (left is not None and left <= 0):
                return False
            time.sleep(self.poll_s)
        granted = self.claim()
        if granted:
            with self.lock:
                self.mine += 1
        return granted


def _trials_left(client: Client, project: str, job_id: int, budget: int | None) -> int | None:
    if budget is None:
        return None
    job = client.jobs.get(project, job_id)
    return 0 if job.state.terminal else budget - job.progress.trials_claimed


def importable_types() -> frozenset[str]:
    """What an imported skops file may hold besides skops' own defaults: the families' allowlists."""
    from miniml.training.families import FAMILIES

    return frozenset(t for f in FAMILIES.values() if f.serialization == "skops" for t in f.trusted_types)


def _import(client: Client, settings: Settings, tracker: Tracker, job: JobRead, run_id: str) -> JobRead:
    """A model built elsewhere: check its types, predict on the example rows, register and sign it."""
    import skops.io as sio

    from miniml.errors import InvalidInput
    from miniml.storage import make_store
    from miniml.training.families import Family

    spec, project, reports = job.spec, job.project, client.job_reports
    version = client.datasets.version(project, job.dataset, job.dataset_version)
    with tempfile.TemporaryDirectory(prefix=f"miniml-import-{job.id}-") as tmp:
        path = Path(tmp) / "model.skops"
        make_store(settings).download(str(spec["object"]), path)
        # Read from the file's schema; nothing is constructed yet.
        found = set(sio.get_untrusted_types(file=path))
        refused = sorted(found - importable_types())
        if refused:
            raise InvalidInput(
                f"The model holds types outside the allowlist: {', '.join(refused[:10])}. The platform imports "
                "scikit-learn, LightGBM and XGBoost pipelines; anything else cannot be loaded safely."
            )
        model = sio.load(path, trusted=sorted(found))
        if not callable(getattr(model, "predict", None)):
            raise InvalidInput(f"The imported object ({type(model).__name__}) has no predict method.")
        data_path = client.datasets.download(
            project, job.dataset, job.dataset_version, Path(tmp) / f"data.{version.format}"
        )
        frame = load_frame(_table(data_path, version))
    target = spec.get("target")
    example = (frame.drop(columns=[target]) if target else frame).head(5)
    try:
        model.predict(example)
    except Exception as exc:
        raise InvalidInput(
            f"The model could not predict on {job.dataset} v{job.dataset_version}'s columns: {public_reason(exc)}"
        ) from exc
    pip = tuple(
        p
        for p, prefix in (("lightgbm", "lightgbm."), ("xgboost-cpu", "xgboost."))
        if any(t.startswith(prefix) for t in found)
    )
    family = Family(
        "imported",
        lambda *_: None,
        scale_numeric=False,
        serialization="skops",
        trusted_types=tuple(sorted(found)),
        pip=pip,
    )
    registered = str(spec["registered_name"])
    model_version = tracker.log_model(
        run_id,
        model,
        family,
        example,
        registered=registered,
        params={"imported": "true"},
        metrics={},
        signing_key=signing_key(settings.auth.model_signing_key, settings.data_dir),
    )
    make_store(settings).delete(str(spec["object"]))
    tracker.finish(run_id, "FINISHED")
    reports.log(
        project, job.id, f"imported {registered} version {model_version}: checked against the allowlist, signed"
    )
    return reports.finish(
        project, job.id, JobFinish(state="succeeded", model_name=registered, model_version=model_version)
    )
