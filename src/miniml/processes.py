"""Starting and stopping the platform's processes for ``miniml up`` (the embedded default).

Each child runs in its own session (process group) so stopping it also stops whatever it
spawned (MLflow's and Prefect's own workers): no orphan survives ``miniml up``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from miniml.config import Settings
from miniml.errors import Conflict, UpstreamUnavailable
from miniml.files import write_secret_file
from miniml.tracking.access import ADMIN_USERNAME, admin_password, auth_config, secret_file

BIN = Path(sys.executable).parent


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int | None
    health_url: str | None
    env: dict[str, str] = field(default_factory=dict)
    # Prefect's worker ignores SIGTERM; SIGINT stops it.
    stop_signal: signal.Signals = signal.SIGTERM
    ready_timeout_s: float = 120.0
    # Services of one phase start together; the next phase starts once they all answer.
    phase: int = 0
    # The variable that moves it to another port (named when its port is taken).
    port_env: str | None = None


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def child_env(settings: Settings) -> dict[str, str]:
    """The environment every child shares: the same settings, the venv's tools on PATH."""
    data = settings.data_dir.resolve()
    env = dict(os.environ)
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "MINIML_MODE": settings.mode.value,
            "MINIML_DATA_DIR": str(data),
            "MINIML_API__PORT": str(settings.api.port),
            "MINIML_MLFLOW__PORT": str(settings.mlflow.port),
            "MINIML_PREFECT__PORT": str(settings.prefect.port),
            "MINIML_INFERENCE__PORT": str(settings.inference.port),
            "MINIML_INFERENCE__WORKERS": str(settings.inference.workers),
            "MLFLOW_TRACKING_URI": settings.mlflow_uri,
            "PREFECT_API_URL": settings.prefect_api_url,
            "PREFECT_HOME": str(data / "prefect"),
            # No outside network: telemetry and update checks would only fail and log noise.
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            "DO_NOT_TRACK": "1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.mlflow.auth:
        # Every child talks to this platform's MLflow as its admin (never an inherited account).
        env["MLFLOW_TRACKING_USERNAME"] = ADMIN_USERNAME
        env["MLFLOW_TRACKING_PASSWORD"] = admin_password(settings.mlflow.admin_password, data)
    return env


def mlflow_auth(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """Extra argv and env that put MLflow's basic-auth app in front of the embedded server."""
    if not settings.mlflow.auth:
        return [], {}
    data = settings.data_dir.resolve()
    password = admin_password(settings.mlflow.admin_password, data)
    ini = write_secret_file(data / "mlflow-auth.ini", auth_config(data, password))
    flask_secret = secret_file(data / "mlflow-flask.secret")
    return ["--app-name", "basic-auth"], {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_secret,
    }


def embedded_services(settings: Settings) -> list[Service]:
    data = settings.data_dir.resolve()
    (data / "prefect").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    auth_argv, auth_env = mlflow_auth(settings)
    return [
        Service(
            name="mlflow",
            argv=[
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{data / 'mlflow.db'}",
                "--artifacts-destination",
                str(data / "mlartifacts"),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(settings.mlflow.port),
                "--workers",
                "1",
                *auth_argv,
            ],
            env=auth_env,
            port=settings.mlflow.port,
            health_url=f"{settings.mlflow_uri}/health",
        ),
        Service(
            name="prefect",
            argv=[str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(settings.prefect.port)],
            port=settings.prefect.port,
            health_url=f"{settings.prefect_api_url}/health",
            env={"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{data / 'prefect' / 'prefect.db'}"},
        ),
        Service(
            name="api",
            argv=[py, "-m", "miniml", "api"],
            port=settings.api.port,
            health_url=f"{settings.api_url}/healthz",
        ),
        Service(
            name="worker",
            argv=[py, "-m", "miniml", "worker"],
            port=None,
            # Ready once the api's /readyz sees the worker's deployment served (and everything else).
            health_url=f"{settings.api_url}/readyz",
            stop_signal=signal.SIGINT,
            phase=1,
        ),
        Service(
            name="inference",
            argv=[py, "-m", "miniml", "inference"],
            port=settings.inference.port,
            health_url=f"{settings.inference_url}/healthz",
            phase=1,
        ),
        *prometheus_service(settings),
    ]


def prometheus_binary() -> str | None:
    import shutil

    return shutil.which("prometheus")


def prometheus_service(settings: Settings) -> list[Service]:
    """Prometheus scraping the local api, inference and worker, with miniml's alert rules; [] if not installed."""
    import yaml

    from miniml.monitoring.dashboards import alert_rules, scrape_config

    binary = prometheus_binary()
    if binary is None:
        return []
    folder = settings.data_dir.resolve() / "prometheus"
    folder.mkdir(parents=True, exist_ok=True)
    local = "127.0.0.1"
    worker = [f"{local}:{settings.worker.metrics_port}"] if settings.worker.metrics_port else []
    token_file = None
    if settings.monitoring.metrics_token:
        token_file = str(write_secret_file(folder / "scrape.token", settings.monitoring.metrics_token))
    config = scrape_config(
        api=[f"{local}:{settings.api.port}"],
        inference=[f"{local}:{settings.inference.port}"],
        worker=worker,
        token_file=token_file,
    )
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "alerts.yml").write_text(yaml.safe_dump(alert_rules(), sort_keys=False))
    port = settings.monitoring.prometheus_port
    return [
        Service(
            name="prometheus",
            argv=[
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address={local}:{port}",
                "--storage.tsdb.retention.time=15d",
            ],
            port=port,
            health_url=f"http://{local}:{port}/-/ready",
            phase=1,
            port_env="MINIML_MONITORING__PROMETHEUS_PORT",
        )
    ]


@dataclass
class ChildState:
    """What ``miniml status`` shows of one child: written to ``<data_dir>/up.json`` as it changes."""

    name: str
    state: str = "starting"  # starting, running, restarting, stopped
    pid: int | None = None
    restarts: int = 0
    started_at: float = 0.0
    last_exit: str | None = None
    last_exit_at: float | None = None
    restart_at: float | None = None
    deaths: list[float] = field(default_factory=list)


def describe_exit(code: int) -> str:
    """'code 1' or 'killed by SIGKILL' (Popen reports a signal as a negative code)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"code {code}"


class CrashLoop(UpstreamUnavailable):
    """A child kept dying: the platform stops rather than restart it forever."""


class Supervisor:
    """Starts the children, restarts one that exits (with backoff), and stops them all in order.

    A child that dies ``max_restarts`` times within ``window_s`` is a crash loop: ``supervise``
    raises ``CrashLoop`` naming it, and ``miniml up`` stops everything.
    """

    def __init__(
        self,
        settings: Settings,
        services: Sequence[Service],
        *,
        max_restarts: int = 5,
        window_s: float = 60.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 15.0,
    ) -> None:
        self.settings = settings
        self.services = list(services)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.children: dict[str, ChildState] = {svc.name: ChildState(svc.name) for svc in self.services}
        self.log_dir = settings.data_dir.resolve() / "logs"
        self.status_file = settings.data_dir.resolve() / "up.json"
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        # Process groups of children that died, kept until stop: a training flow outlives its
        # killed worker and finishes its job; ``stop_all`` still ends it.
        self.orphans: list[int] = []
        self.events: list[str] = []

    def check_ports(self) -> None:
        for svc in self.services:
            if svc.port is not None and not port_is_free(svc.port):
                raise Conflict(
                    f"Port {svc.port} for {svc.name} is already in use. Stop what holds it, or choose another "
                    f"port ({svc.port_env or f'MINIML_{svc.name.upper()}__PORT'}=...)."
                )

    def start(self, svc: Service) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = child_env(self.settings) | svc.env
        with open(self.log_dir / f"{svc.name}.log", "ab") as log:
            proc = self.procs[svc.name] = subprocess.Popen(
                svc.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                cwd=self.settings.data_dir.resolve(),
            )
        child = self.children[svc.name]
        child.pid, child.started_at, child.restart_at = proc.pid, time.time(), None
        child.state = "starting" if svc.health_url else "running"

    def wait_ready(self, svc: Service) -> float:
        """Wait for the service's health URL; return the seconds it took."""
        start = time.monotonic()
        proc = self.procs[svc.name]
        while svc.health_url:
            if proc.poll() is not None:
                raise UpstreamUnavailable(
                    f"{svc.name} exited with code {proc.returncode} while starting; see {self.log_dir / svc.name}.log."
                )
            if self._answers(svc):
                break
            if time.monotonic() - start > svc.ready_timeout_s:
                raise UpstreamUnavailable(
                    f"{svc.name} did not answer {svc.health_url} within {svc.ready_timeout_s:.0f}s; "
                    f"see {self.log_dir / svc.name}.log."
                )
            time.sleep(0.3)
        self.children[svc.name].state = "running"
        return time.monotonic() - start

    @staticmethod
    def _answers(svc: Service, timeout_s: float = 2.0) -> bool:
        if not svc.health_url:
            return True
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(svc.health_url, timeout=timeout_s).status_code < 500
        return False

    def start_all(self) -> dict[str, float]:
        """Start phase by phase; return how long each service took to answer."""
        self.check_ports()
        timings: dict[str, float] = {}
        for phase in sorted({svc.phase for svc in self.services}):
            batch = [svc for svc in self.services if svc.phase == phase]
            start = time.monotonic()
            for svc in batch:
                self.start(svc)
            for svc in batch:
                self.wait_ready(svc)
                timings[svc.name] = time.monotonic() - start
        self.write_status()
        return timings

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def supervise(self) -> list[str]:
        """One pass: note children that exited, restart those whose backoff is over, mark the
        restarted ones running once they answer. Returns what happened, a line each."""
        now = time.time()
        events: list[str] = []
        for svc in self.services:
            child, proc = self.children[svc.name], self.procs.get(svc.name)
            if proc is None:
                continue
            if child.state in ("starting", "running") and proc.poll() is not None:
                events.append(self._exited(svc, child, proc.returncode, now))
            elif child.state == "restarting" and child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self.start(svc)
                events.append(f"{svc.name} restarted (pid {child.pid}, restart {child.restarts})")
            elif child.state == "starting" and self._answers(svc, timeout_s=0.5):
                child.state = "running"
                events.append(f"{svc.name} is answering again")
        if events:
            self.events.extend(events)
            self.write_status()
        return events

    def _exited(self, svc: Service, child: ChildState, code: int, now: float) -> str:
        how = describe_exit(code)
        child.last_exit, child.last_exit_at, child.state = how, now, "restarting"
        child.deaths = [t for t in child.deaths if now - t < self.window_s] + [now]
        pid = self.procs[svc.name].pid
        if svc.port is not None:
            # A server's leftovers would hold its port: end the whole group before the restart.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        else:
            self.orphans.append(pid)
        if len(child.deaths) > self.max_restarts:
            child.state = "stopped"
            self.write_status()
            raise CrashLoop(
                f"{svc.name} exited {len(child.deaths)} times within {self.window_s:.0f}s (last: {how}); "
                f"stopping the platform. See {self.log_dir / svc.name}.log."
            )
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (len(child.deaths) - 1))
        child.restart_at = now + delay
        return f"{svc.name} exited ({how}); restarting in {delay:.0f}s"

    def write_status(self, state: str = "running") -> None:
        """Write ``up.json`` for ``miniml status`` (atomically: a reader never sees half of it)."""
        import json

        body = {
            "pid": os.getpid(),
            "state": state,
            "updated_at": time.time(),
            "children": [
                {k: v for k, v in vars(c).items() if k != "deaths"} | {"url": svc.health_url, "port": svc.port}
                for svc, c in ((svc, self.children[svc.name]) for svc in self.services)
            ],
        }
        with contextlib.suppress(OSError):
            tmp = self.status_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(body, indent=1))
            tmp.replace(self.status_file)

    def stop_all(self, timeout_s: float = 15.0) -> None:
        """Signal every child's process group, wait, then kill what is left."""
        by_name = {svc.name: svc for svc in self.services}
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, by_name[name].stop_signal)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        groups = [proc.pid for proc in self.procs.values()] + self.orphans
        for pgid in groups:
            # Kill the whole group, also when the leader exited but left children behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for child in self.children.values():
            child.state = "stopped"
        self.write_status("stopped")
