"""The control-plane FastAPI app: ``create_app(settings)``."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from miniml import console, logs
from miniml.api import errors, mlflow_users
from miniml.api.middleware import ApiMetrics, RequestMiddleware
from miniml.api.openapi import documented_openapi
from miniml.api.routes import audit, auth, datasets, deployments, health, jobs, keys, models, monitoring, projects, seed
from miniml.config import Settings
from miniml.db.engine import make_engine, make_sessionmaker, upgrade
from miniml.domain.roles import Role
from miniml.drain import Drain
from miniml.errors import InvalidInput, MiniMLError, NotFound, UpstreamUnavailable
from miniml.files import secure_data_dir, write_secret_file
from miniml.monitoring.collector import PlatformCollector
from miniml.orchestration.submit import Orchestrator
from miniml.services import jobs as job_service
from miniml.services import keys as key_service
from miniml.services import secrets
from miniml.storage import make_store
from miniml.tracking import RUN_STATUS
from miniml.tracking.access import MlflowAccess, use_admin_credentials
from miniml.tracking.registry import Registry

log = logging.getLogger("miniml.api")


def write_admin_key(data_dir: Path, raw: str) -> Path:
    """Write the bootstrap admin key where only this user can read it."""
    return write_secret_file(data_dir / "admin.key", raw)


def bootstrap_keys(settings: Settings, session: Session) -> str | None:
    """The first admin key (returned, once) and the service keys the worker and inference read.

    Keys given in the settings (from a Kubernetes Secret, where no folder is shared) are stored as
    they are and written nowhere: MINIML_AUTH__ADMIN_KEY when there is no key yet, and
    MINIML_WORKER__API_KEY and MINIML_INFERENCE__API_KEY whenever they are new."""
    if settings.auth.admin_key:
        raw = key_service.bootstrap_admin_key(session, given=settings.auth.admin_key)
    else:
        raw = key_service.bootstrap_admin_key(session) if settings.auth.bootstrap_admin_key else None
        if raw:
            write_admin_key(settings.data_dir, raw)
    services = (
        (Role.worker, settings.worker.api_key, "MINIML_WORKER__API_KEY"),
        (Role.inference, settings.inference.api_key, "MINIML_INFERENCE__API_KEY"),
    )
    for role, given, setting in services:
        if given:
            if key_service.register_given_key(session, given, role, what=setting):
                log.info("service key stored", extra={"role": role.value, "setting": setting})
            continue
        path = settings.data_dir / f"{role.value}.key"
        if settings.auth.bootstrap_service_keys and not path.exists():
            write_secret_file(path, key_service.create_service_key(session, role))
    return raw


def settle_silent_jobs(settings: Settings, db: sessionmaker[Session], registry: Registry) -> int:
    """End the running jobs whose worker went silent; queue their MLflow runs to end to match."""
    with db.begin() as session:
        reaped = job_service.reap_stale_jobs(session, timeout_s=settings.jobs.heartbeat_timeout_s)
    for job_id, run_id, state in reaped:
        log.warning("job ended: no heartbeat", extra={"job_id": job_id, "state": state.value})
        if run_id:  # its worker is gone: end its MLflow runs as the worker would have
            registry.end_runs_soon(run_id, RUN_STATUS[state.value])
    return len(reaped)


def end_open_runs(db: sessionmaker[Session], registry: Registry) -> list[str]:
    """End the MLflow runs of ended jobs to match their state (kept in the DB, so an api restart or an
    MLflow outage only delays it); return the errors of those left for the next round."""
    with db.begin() as session:
        pending = job_service.jobs_with_open_runs(session)
    errors = []
    for job_id, run_id, state in pending:
        try:
            registry.end_runs(run_id, RUN_STATUS[state])
        except UpstreamUnavailable as exc:
            errors.append(exc.detail)
            break  # MLflow is away: the next round tries again
        except (NotFound, InvalidInput):
            pass  # no such run (deleted, or MLflow reset): nothing to end
        with db.begin() as session:
            job_service.runs_closed(session, job_id)
    return errors


async def supervise_jobs(
    settings: Settings,
    db: sessionmaker[Session],
    orchestrator: Orchestrator,
    registry: Registry,
    access: MlflowAccess | None = None,
) -> None:
    """Retry submissions Prefect could not take, end jobs whose worker went silent (and their MLflow
    runs, retried while MLflow is away), run monitoring schedules."""

    synced = {"at": 0.0}
    # A job's silence counts from the api's start too: while the api was down (restarting,
    # upgraded) its workers could not report, and they are back within a heartbeat or two.
    up_since = time.monotonic()

    def tick() -> None:
        if time.monotonic() - synced["at"] >= settings.jobs.mlflow_sync_s:
            synced["at"] = time.monotonic()
            mlflow_users.sync(access, db)
        if time.monotonic() - up_since >= settings.jobs.heartbeat_timeout_s:
            settle_silent_jobs(settings, db, registry)
        errors = registry.end_pending_runs()
        errors += end_open_runs(db, registry)
        if errors:
            log.warning("MLflow runs of ended jobs left open for now", extra={"error": errors[0][:200]})
        for step in (orchestrator.submit_pending, lambda: orchestrator.supervise_monitoring(registry)):
            try:  # each step on its own: Prefect refusing a job must not stop the drift schedule
                step()
            except MiniMLError as exc:
                log.info("submission deferred", extra={"error": exc.detail[:300]})

    while True:
        try:
            await anyio.to_thread.run_sync(tick)
        except Exception:  # the DB may be down for a while; the loop must outlive that
            log.warning("job supervision tick failed", exc_info=True)
        await anyio.sleep(settings.jobs.loop_interval_s)


def create_app(settings: Settings) -> FastAPI:
    engine = make_engine(
        settings.db_url, connect_timeout_s=settings.db.connect_timeout_s, pool_size=settings.db.pool_size
    )
    db = make_sessionmaker(engine)
    store = make_store(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.drain.install()
        upgrade(engine)
        await anyio.to_thread.run_sync(store.prepare)
        with db.begin() as session:
            app.state.jwt_secret = settings.auth.jwt_secret or secrets.read_or_create_secret(session, "jwt")
            raw = bootstrap_keys(settings, session)
            admin_id = raw.split("_")[1] if raw else None
        if raw and admin_id:
            mlflow_users.created(app.state.mlflow_access, admin_id, Role.admin, [], raw)
        if raw and settings.auth.admin_key:
            print("miniml: stored the first admin key, given in MINIML_AUTH__ADMIN_KEY", flush=True)
        elif raw:
            path = settings.data_dir / "admin.key"
            # Shown once, and only on a terminal: a log file (miniml up's, a container's) must never
            # hold it. `miniml up` reads the file and prints the key to its own terminal.
            shown = f":\n  {raw}" if sys.stdout.isatty() else "; read it there"
            print(f"miniml: created the first admin key (saved to {path}){shown}", flush=True)
        # Jobs a crash left running with no live worker end once the api has been up for
        # jobs.heartbeat_timeout_s (supervise_jobs): a live worker reports in first. Queued jobs
        # stay queued (submitted or not, the supervisor and Prefect still run them).
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(
                supervise_jobs, settings, db, app.state.orchestrator, app.state.registry, app.state.mlflow_access
            )
            yield
            tasks.cancel_scope.cancel()
        app.state.orchestrator.close()
        engine.dispose()

    app = FastAPI(
        title="miniml",
        version="0.1.0",
        summary="A small, honest ML platform: datasets, training, registry, deployments, monitoring.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.drain = Drain(settings.api.drain_s)
    app.state.engine = engine
    app.state.db = db
    app.state.store = store
    app.state.orchestrator = Orchestrator(settings, db)
    app.state.registry = Registry(settings.mlflow_uri)
    app.state.mlflow_access = None
    if settings.mlflow.auth:
        user, password = use_admin_credentials(settings.mlflow.admin_password, settings.data_dir)
        app.state.mlflow_access = MlflowAccess(settings.mlflow_uri, user, password)
    app.state.metrics = ApiMetrics()
    app.state.metrics.registry.register(PlatformCollector(db, quality_window_s=settings.monitoring.quality_window_s))
    errors.install(app)
    for module in (health, auth, keys, projects, datasets, jobs, models, deployments, monitoring, audit, seed):
        app.include_router(module.router)
    app.include_router(deployments.inference_router)
    console.mount(app)  # /ui: pages that call the routes above, as the SDK does
    app.openapi = lambda: documented_openapi(app)  # type: ignore[method-assign]
    app.add_middleware(
        RequestMiddleware,  # type: ignore[arg-type]
        metrics=app.state.metrics,
        db=db,
        max_json_bytes=settings.api.max_json_bytes,
        max_upload_bytes=settings.api.max_upload_bytes,
    )
    return app


def main_app() -> FastAPI:
    """Uvicorn factory entry: settings from the environment."""
    import pyarrow as pa

    settings = Settings()
    secure_data_dir(settings.data_dir)
    logs.configure(settings.log_level)
    # The api parses uploads with Arrow now and then: the system allocator hands memory back where
    # Arrow's default (mimalloc) keeps tens of MB reserved after the first upload.
    pa.set_memory_pool(pa.system_memory_pool())
    _few_malloc_arenas()
    return create_app(settings)


def _few_malloc_arenas() -> None:
    """An upload runs on a dozen threads (receive, parse, profile, S3 parts); glibc would give each
    its own malloc arena, each keeping its peak. Two arenas hold the same work in less memory."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).mallopt(-8, 2)  # M_ARENA_MAX
