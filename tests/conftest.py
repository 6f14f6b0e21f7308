"""Shared fixtures: a real app per test on SQLite (and PostgreSQL where a test asks for it)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from miniml.orchestration.trainer import thread_budget

# The tests train in this process as a worker's trainer does: under the thread budget, set before
# numpy, scikit-learn or torch load (the refit lifts it, as in production). Without it two trial
# threads each start a thread per core, and a 0.5 s fit takes 20 s on a busy machine.
for _name, _value in thread_budget(0).items():
    os.environ.setdefault(_name, _value)

import psycopg  # noqa: E402
import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from miniml.api.app import create_app  # noqa: E402
from miniml.config import Settings  # noqa: E402
from miniml.domain.roles import Role  # noqa: E402
from miniml.domain.tenancy import Caller  # noqa: E402
from miniml.schemas.keys import KeyCreate  # noqa: E402
from miniml.schemas.projects import ProjectCreate  # noqa: E402
from miniml.services import keys, projects  # noqa: E402

# The session's MLflow runs behind its basic-auth app, as under miniml up: this process (and the
# workers it starts) talk to it as its admin.
MLFLOW_ADMIN_PASSWORD = os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", secrets.token_urlsafe(24))
os.environ.setdefault("MLFLOW_TRACKING_USERNAME", "miniml")

# Tests that have no MLflow server expect a quick 503, not minutes of retries.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

PG_URL = os.environ.get("MINIML_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_admin_dsn() -> str:
    return PG_URL.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="session")
def pg_available() -> bool:
    try:
        psycopg.connect(_pg_admin_dsn(), connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


@pytest.fixture
def pg_url(pg_available: bool) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    if not pg_available:
        pytest.skip(f"PostgreSQL tests skipped: no server answers at {PG_URL} (set MINIML_TEST_PG_URL).")
    name = f"miniml_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_pg_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(_pg_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Parametrises a test over both metadata DBs."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'miniml.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        mlflow={"port": free_port()},
        prefect={"port": free_port()},
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def admin_key(client: TestClient, settings: Settings) -> str:
    return (settings.data_dir / "admin.key").read_text().strip()


@pytest.fixture
def admin(client: TestClient, admin_key: str) -> dict[str, str]:
    return {"X-API-Key": admin_key}


@pytest.fixture
def make_project(client: TestClient) -> Callable[[str], str]:
    def make(name: str) -> str:
        with client.app.state.db.begin() as session:  # type: ignore[attr-defined]
            projects.create_project(session, Caller("test", Role.admin, None), ProjectCreate(name=name))
        return name

    return make


@pytest.fixture
def make_key(client: TestClient) -> Callable[..., dict[str, str]]:
    """Headers for a new key of a role, granted the given projects (through the service layer)."""

    def make(role: str, *projects_: str, expires_in_days: float | None = None) -> dict[str, str]:
        with client.app.state.db.begin() as session:  # type: ignore[attr-defined]
            _read, raw = keys.create_key(
                session,
                Caller("test", Role.admin, None),
                KeyCreate(role=Role(role), projects=list(projects_), expires_in_days=expires_in_days),
            )
        return {"X-API-Key": raw}

    return make


def assert_problem(response: object, status: int, *needles: str) -> dict[str, object]:
    """The response is problem+json with this status, and its detail names every needle."""
    from httpx import Response

    assert isinstance(response, Response)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and body["request_id"]
    for needle in needles:
        assert needle.lower() in body["detail"].lower(), (needle, body["detail"])
    return dict(body)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server: a real HTTP endpoint speaking the S3 protocol, on a loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_settings(endpoint: str, bucket: str) -> dict[str, object]:
    return {
        "kind": "s3",
        "endpoint_url": endpoint,
        "bucket": bucket,
        "access_key_id": "test-access",
        "secret_access_key": "test-secret",
        "prefix": "miniml",
    }


@pytest.fixture(params=["local", "s3"])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings whose object store is the local folder or S3 (moto's server): one contract, two stores."""
    storage: dict[str, object] = {}
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        storage = s3_settings(endpoint, f"b-{uuid.uuid4().hex[:10]}")
    return Settings(
        data_dir=tmp_path / "data", storage=storage, mlflow={"port": free_port()}, prefect={"port": free_port()}
    )


def _supervised(tmp_path_factory: pytest.TempPathFactory, names: set[str], **ports: int) -> Iterator[Settings]:
    from miniml.processes import Supervisor, embedded_services

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("services"),
        mlflow={"port": ports.get("mlflow", free_port()), "admin_password": MLFLOW_ADMIN_PASSWORD},
        prefect={"port": ports.get("prefect", free_port())},
        api={"port": free_port()},
    )
    sup = Supervisor(settings, [s for s in embedded_services(settings) if s.name in names])
    try:
        sup.start_all()
        yield settings
    finally:
        sup.stop_all()


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow server (SQLite backend, proxied artifacts) for the whole session."""
    for settings in _supervised(tmp_path_factory, {"mlflow"}):
        yield settings.mlflow_uri


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server for the whole session."""
    for settings in _supervised(tmp_path_factory, {"prefect"}):
        yield settings.prefect_api_url


@pytest.fixture
def make_key_for() -> Callable[..., dict[str, str]]:
    """Headers for a new key on any app client (through the service layer)."""

    def make(client: TestClient, role: str, *projects_: str) -> dict[str, str]:
        with client.app.state.db.begin() as session:  # type: ignore[attr-defined]
            _read, raw = keys.create_key(
                session, Caller("test", Role.admin, None), KeyCreate(role=Role(role), projects=list(projects_))
            )
        return {"X-API-Key": raw}

    return make


class LiveApi:
    """The real app served by uvicorn on a loopback port, in a thread of the test process."""

    def __init__(self, settings: Settings) -> None:
        import threading

        import uvicorn

        self.settings = settings
        self.app = create_app(settings)
        self.url = f"http://127.0.0.1:{settings.api.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=settings.api.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveApi:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the api did not start")
            time.sleep(0.05)
        self.key = (self.settings.data_dir / "admin.key").read_text().strip()
        self.headers = {"X-API-Key": self.key}
        # The services' own keys, as the api wrote them: only the worker's reaches the job routes.
        self.worker_key = (self.settings.data_dir / "worker.key").read_text().strip()
        self.inference_key = (self.settings.data_dir / "inference.key").read_text().strip()
        return self

    def worker_client(self) -> Any:
        from miniml.sdk.client import Client

        return Client(self.url, api_key=self.worker_key, timeout=60, outlast_s=self.settings.worker.outlast_api_s)

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class LiveInference:
    """The inference service served by uvicorn on its configured port, in a thread of the test process."""

    def __init__(self, settings: Settings) -> None:
        import threading

        import uvicorn

        from miniml.inference.app import create_inference_app

        self.app = create_inference_app(settings)
        self.url = f"http://127.0.0.1:{settings.inference.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=settings.inference.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveInference:
        import time

        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the inference service did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Background loops of in-process services may outlive the last test by a moment; keep their
    log lines from landing after pytest's summary."""
    import logging

    root = logging.getLogger("miniml")
    # Child loggers reach the parent's handlers even when the parent is disabled: swap them out.
    root.handlers[:] = [logging.NullHandler()]
    root.propagate = False


# The files that take minutes (real platforms, restarts) start first: with tests spread by file
# over a few processes, a long file that starts last leaves the others idle while it runs.
SLOW_FILES = (  # longest first, as measured (--durations=0, summed per file): scripts/test keeps this order
    "tests/orchestration/test_prefect.py",
    "tests/test_readme.py",
    "tests/orchestration/test_runner.py",
    "tests/training/test_training.py",
    "tests/test_resilience.py",
    "tests/inference/test_serving.py",
    "tests/orchestration/test_dashboards.py",
    "tests/test_up.py",
    "tests/console/test_browser.py",
    "tests/api/test_datasets.py",
    "tests/inference/test_rollouts.py",
    "tests/api/test_concurrency.py",
    "tests/api/test_jobs.py",
    "tests/api/test_auth.py",
    "tests/deploy/test_production.py",
    "tests/api/test_openapi.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return SLOW_FILES.index(path) if path in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order inside a file, and of the other files, is kept


@pytest.fixture(scope="session", autouse=True)
def trainer_server() -> Iterator[subprocess.Popen[bytes]]:
    """Jobs the tests run in-process fork their trainers from a server, as a worker's jobs do
    (a job whose thread budget differs from the server's spawns its trainer instead)."""
    from miniml.orchestration.trainer import SERVER_ENV, start_server

    server = start_server(0)
    yield server
    os.environ.pop(SERVER_ENV, None)
    assert server.stdin is not None
    server.stdin.close()  # it ends once the trainers it forked have
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()  # a test left a trainer running; that test says so itself
        server.wait()
