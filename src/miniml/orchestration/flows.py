"""The Prefect flow that runs a training job, and the worker that serves it."""

from __future__ import annotations

import os
import threading
from typing import Any

from prefect import flow, get_run_logger

from miniml import logs
from miniml.config import Settings
from miniml.orchestration import DEPLOYMENT_NAME, DRIFT_FLOW, EVALUATE_FLOW, FLOW_NAME


def worker_client(settings: Settings) -> object:
    from miniml.files import read_key_file
    from miniml.sdk.client import Client

    # Unset: the key the api wrote on start, on the data volume the roles share (miniml up, compose).
    key = settings.worker.api_key or read_key_file(settings.data_dir, "worker")
    if not key:
        raise RuntimeError(
            "The worker has no API key: set MINIML_WORKER__API_KEY to a key of the worker role "
            "(an admin creates one with POST /api/v1/keys {'role': 'worker'})."
        )
    return Client(settings.api_url, api_key=key, timeout=60, outlast_s=settings.worker.outlast_api_s)


@flow(name=FLOW_NAME, log_prints=True, retries=0)
def train_job_flow(job_id: int, project: str, shard: int = 0, created: float | None = None) -> str:
    """Train one job (or one shard of a parallel job); the api owns its state."""
    from miniml.orchestration.runner import run_job
    from miniml.sdk.client import Client

    settings = Settings()  # the flow entry builds its settings from the worker's environment
    logs.configure(settings.log_level)
    client = worker_client(settings)
    assert isinstance(client, Client)
    result = run_job(client, settings, job_id, project, shard=shard, created=created)
    state = (
        "skipped (another worker has it, or it is not this platform's job)" if result is None else result.state.value
    )
    get_run_logger().info("job %s shard %s: %s", job_id, shard, state)
    return state


def _monitor(kind: str, run_id: int, project: str, deployment: str) -> str:
    """Run a drift check or an evaluation with the worker's settings and key; log how it ended."""
    from miniml.orchestration import monitor
    from miniml.sdk.client import Client

    settings = Settings()
    logs.configure(settings.log_level)
    client = worker_client(settings)
    assert isinstance(client, Client)
    run = monitor.run_drift_check if kind == "drift check" else monitor.run_evaluation
    state = run(client, settings, project, deployment, run_id)
    get_run_logger().info("%s %s of %s: %s", kind, run_id, deployment, state)
    return state


@flow(name=DRIFT_FLOW, log_prints=True, retries=0)
def drift_check_flow(report_id: int, project: str, deployment: str) -> str:
    """Compare a deployment's captured requests with its training data; the api stores the report."""
    return _monitor("drift check", report_id, project, deployment)


@flow(name=EVALUATE_FLOW, log_prints=True, retries=0)
def evaluate_flow(retraining_id: int, project: str, deployment: str) -> str:
    """Score champion and challenger on the same held-out rows; the api promotes or keeps."""
    return _monitor("retraining", retraining_id, project, deployment)


def wait_for_prefect(settings: Settings, timeout_s: float = 120) -> None:
    """Compose and `miniml up` may start the worker before Prefect answers: wait instead of dying."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    url = f"{settings.prefect_api_url}/health"
    while True:
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Prefect did not answer at {url} within {timeout_s:.0f}s")
        time.sleep(1)


def outlast_prefect_outages() -> None:
    """Keep the worker through a Prefect outage: its poll for runs says so and tries again.

    Prefect's runner polls in a service loop that ends after a few failures in a row (a second or
    two at ``worker.poll_s``), and the runner then shuts down with it: a Prefect restart ended the
    worker, and the job it was running with it. Here a poll that cannot reach Prefect is not a
    failure of the loop: the runner lives on, its running flow runs too, and polls again."""
    from prefect.runner._scheduled_run_poller import ScheduledRunPoller

    poll = ScheduledRunPoller._get_and_submit_flow_runs
    if getattr(poll, "outlasts_outages", False):
        return
    unreachable = [False]

    async def polled(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await poll(self, *args, **kwargs)
        except Exception as exc:
            if not prefect_unreachable(exc):
                raise
            if not unreachable[0]:
                print(f"Prefect is unreachable ({type(exc).__name__}); polling again until it answers.", flush=True)
            unreachable[0] = True
            return
        if unreachable[0]:
            print("Prefect answers again.", flush=True)
        unreachable[0] = False

    polled.outlasts_outages = True  # type: ignore[attr-defined]
    ScheduledRunPoller._get_and_submit_flow_runs = polled  # type: ignore[method-assign]


# What a flow run imports before its job can start: imported once, by the forkserver.
FLOW_PRELOAD = [
    "prefect.flow_engine",
    "miniml.orchestration.flows",
    "miniml.orchestration.runner",
    "miniml.orchestration.monitor",
    "miniml.sdk.client",
    "miniml.cli.main",  # a run imports the worker's main module again: `miniml worker` (the console script)
]


class _ForkingMultiprocessing:
    """Stands in for the ``multiprocessing`` module inside ``prefect.flow_engine``: its contexts are
    all the forkserver's."""

    def __init__(self, module: Any, context: Any) -> None:
        self._module, self._context = module, context

    def get_context(self, method: str | None = None) -> Any:
        return self._context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def fork_flow_runs(preload: list[str] = FLOW_PRELOAD) -> None:
    """Start each flow run as a fork of a process that imported its code once.

    Prefect's runner starts a flow run with multiprocessing's *spawn*: a new interpreter that imports
    Prefect, MLflow and scikit-learn again, 4-5 s of CPU before the job can start. The standard
    library's forkserver imports them once; a run is then a fork of it and starts in milliseconds. The
    run itself is unchanged: Prefect hands it the same pickled call, environment and control channel,
    and gets back a process it can join, signal and kill. The forkserver ends with this process.
    """
    import multiprocessing
    import multiprocessing.forkserver

    import prefect.flow_engine as engine

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    multiprocessing.forkserver.ensure_running()  # import now, not when the first job waits
    setattr(engine, "multiprocessing", _ForkingMultiprocessing(multiprocessing, context))  # noqa: B010


def _make_optuna_tables(url: str) -> None:
    try:
        from miniml.training.search import make_storage

        storage = make_storage(url)
        storage.engine.dispose()
    except Exception as exc:  # the first job makes them then
        print(f"Optuna's tables not made ahead of the first job: {str(exc)[:200]}", flush=True)


def serve(settings: Settings) -> None:
    """`miniml worker`: register the deployments (train, drift check, evaluate) and run their flow runs."""
    from miniml.orchestration.trainer import SERVER_ENV, start_server, wait_server

    # Jobs' trainers fork from it: their imports are done once, not per job (the flow runs inherit its name).
    start_server(settings.worker.trial_threads)
    fork_flow_runs()
    # Optuna's tables exist before the first job opens its study (a first job paid for making them).
    threading.Thread(target=_make_optuna_tables, args=(settings.db_url,), name="optuna-tables", daemon=True).start()
    if not wait_server(os.environ[SERVER_ENV], 120):  # the first job then starts as fast as the next
        print("The trainer server is not up after 120 s: jobs spawn their trainers until it is.", flush=True)
    outlast_prefect_outages()
    serve_flows(settings, (train_job_flow, drift_check_flow, evaluate_flow))


def prefect_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it, or one of a group) says Prefect did not answer: a
    refused or broken connection, a websocket that closed, or a 5xx while it restarts."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError
    from websockets.exceptions import WebSocketException

    seen: set[int] = set()
    todo = [exc]
    while todo:
        err = todo.pop()
        if id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, PrefectHTTPStatusError):
            if err.response.status_code >= 500:
                return True
        elif isinstance(err, (httpx.TransportError, OSError, WebSocketException)):
            return True
        if isinstance(err, BaseExceptionGroup):
            todo.extend(err.exceptions)
        todo.extend(e for e in (err.__cause__, err.__context__) if e is not None)
    return False


def serve_flows(settings: Settings, flows: tuple[Any, ...]) -> None:
    """Register ``flows`` with Prefect and run their flow runs until stopped.

    Prefect may go away at any moment, also between its health check and the registration, or
    while the runner starts (``miniml up`` restarts it, compose may start it late): the worker
    then says so, waits until Prefect answers and registers again, instead of exiting."""
    import asyncio
    import signal

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    on_sigterm = signal.getsignal(signal.SIGTERM)
    while True:
        signal.signal(signal.SIGTERM, on_sigterm)  # not a runner's that ended: SIGTERM still stops the worker
        wait_for_prefect(settings)
        runner = Runner(limit=settings.worker.concurrency, query_seconds=settings.worker.poll_s, pause_on_shutdown=True)
        try:
            for flow_ in flows:
                # Added as flows, not as deployments: the runner then starts a run from the flow in memory
                # (a fork, above) instead of `python -m prefect.engine` loading it from storage again.
                runner.add_flow(flow_, name=DEPLOYMENT_NAME)
            print(
                f"Flows {', '.join(f.name for f in flows)} (deployment {DEPLOYMENT_NAME}) are being served; "
                f"asking Prefect for runs every {settings.worker.poll_s:g}s. Ctrl-C stops the worker.",
                flush=True,
            )
            asyncio.run(runner.start())
            return
        except (KeyboardInterrupt, TerminationSignal):
            print("Worker stopped.")
            return
        except Exception as exc:
            if not prefect_unreachable(exc):
                raise
            print(
                f"Prefect went away while the worker registered or ran its flows ({type(exc).__name__}); "
                "registering again once it answers.",
                flush=True,
            )
