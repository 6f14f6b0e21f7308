"""The platform through real processes: a live api, the Prefect and MLflow servers, `miniml worker`s."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import psutil
import pytest

from miniml.config import Settings
from miniml.sdk.client import Client
from tests.conftest import LiveApi, free_port

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"


class Workers(Protocol):
    def __call__(
        self, n: int, *, wait: bool = False, extra: dict[str, str] | None = None
    ) -> list[subprocess.Popen[bytes]]: ...


@pytest.fixture
def platform(
    tmp_path: Path, mlflow_uri: str, prefect_api: str, request: pytest.FixtureRequest
) -> Iterator[tuple[LiveApi, Client, Workers]]:
    db = {"url": request.getfixturevalue("pg_url")} if "pg" in request.keywords else {}
    settings = Settings(
        data_dir=tmp_path / "d",
        api={"port": free_port()},
        db=db,
        prefect={"api_url": prefect_api},
        mlflow={"tracking_uri": mlflow_uri},
        jobs={"heartbeat_timeout_s": 8, "loop_interval_s": 0.5},
    )
    procs: list[subprocess.Popen[bytes]] = []

    def start_workers(
        n: int, *, wait: bool = False, extra: dict[str, str] | None = None
    ) -> list[subprocess.Popen[bytes]]:
        env = dict(os.environ)
        env.update(
            {
                "MINIML_DATA_DIR": str(settings.data_dir),
                "MINIML_API__PORT": str(settings.api.port),
                "MINIML_PREFECT__API_URL": prefect_api,
                "PREFECT_API_URL": prefect_api,
                "MINIML_MLFLOW__TRACKING_URI": mlflow_uri,
                "MINIML_WORKER__HEARTBEAT_S": "1",
                "MINIML_WORKER__CONCURRENCY": "1",
                "MINIML_WORKER__TRIAL_THREADS": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MINIML_WORKER__METRICS_PORT": "0",
            }
            | (extra or {})
        )
        if db:
            env["MINIML_DB__URL"] = db["url"]
        started, logs = [], []
        for _ in range(n):
            logs.append(tmp_path / f"worker{len(procs)}.log")
            log = logs[-1].open("wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "miniml", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            procs.append(proc)
            started.append(proc)
        if wait:  # each worker polls Prefect once it prints this
            wait_for(lambda: all("being served" in p.read_text(errors="replace") for p in logs), 120, "the workers")
        return started

    with LiveApi(settings) as api:
        client = Client(api.url, api_key=api.key, timeout=30)
        client.projects.create("demo")
        client.datasets.upload("demo", IRIS)
        try:
            yield api, client, start_workers
        finally:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGINT)
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            _clear_queue(prefect_api)


def _clear_queue(prefect_api: str) -> None:
    """Tests share one Prefect server: flow runs a test left waiting must not take the next test's workers."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    waiting = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
    runs_filter = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=waiting)))
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as prefect:
        for run in prefect.read_flow_runs(flow_run_filter=runs_filter):
            prefect.delete_flow_run(run.id)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def slow_dataset(path: Path) -> Path:
    """Rows enough that a random-forest trial of seed 0 (200 trees, depth 15, every feature: the
    sampler's first draw) fits for minutes: about 0.5 s a tree, 200 trees, 3 folds on two cores."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50_000, 20)).astype("float32")
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(20)])
    frame["label"] = np.where(x[:, 0] + rng.normal(size=len(x)) > 0, "yes", "no")
    frame.to_parquet(path)
    return path


def trainers_of(job_id: int, data_dir: Path) -> list[psutil.Process]:
    """The job's trainer processes, wherever they are (on this platform: other tests' jobs share ids).

    A spawned trainer's command line has these words as arguments; a forked one (from the
    worker's trainer server) has them in its process title, one string."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        words = " ".join(proc.info["cmdline"] or []).split()
        if "miniml.orchestration.trainer" in words and f"job-{job_id}" in words and str(data_dir.resolve()) in words:
            found.append(proc)
    return found


def group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members
