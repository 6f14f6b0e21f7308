"""`miniml up` starts every service as a real process and stops them all."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow
SERVICES = ("api", "mlflow", "prefect", "inference", "prometheus", "worker_metrics")


def _start(tmp_path: Path, ports: dict[str, int]) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.update(
        {
            "MINIML_DATA_DIR": str(tmp_path / "data"),
            "MINIML_API__PORT": str(ports["api"]),
            "MINIML_MLFLOW__PORT": str(ports["mlflow"]),
            "MINIML_PREFECT__PORT": str(ports["prefect"]),
            "MINIML_INFERENCE__PORT": str(ports["inference"]),
            "MINIML_MONITORING__PROMETHEUS_PORT": str(ports["prometheus"]),
            "MINIML_WORKER__METRICS_PORT": str(ports["worker_metrics"]),
            "COLUMNS": "200",
        }
    )
    # Started as a script's background job is (`miniml up &`): with SIGINT ignored. Its stop by
    # SIGINT below shows an interrupt stops it all the same.
    return subprocess.Popen(
        [sys.executable, "-m", "miniml", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    assert proc.stdout is not None
    out = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out += line
        if re.search(pattern, out):
            return out
    raise AssertionError(f"never saw {pattern!r}; output:\n{out}")


def test_up_starts_every_service_and_stops_them_all(tmp_path: Path) -> None:
    ports = {name: free_port() for name in SERVICES}
    proc = _start(tmp_path, ports)
    try:
        out = _read_until(proc, r"Press Ctrl-C", 180)
        key = re.search(r"admin key\s+(mml_\S+)", out)
        assert key, out
        assert (tmp_path / "data" / "admin.key").read_text().strip() == key.group(1)
        assert httpx.get(f"http://127.0.0.1:{ports['api']}/healthz").status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{ports['api']}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert {c["name"] for c in ready.json()["checks"]} == {"database", "mlflow", "prefect", "worker"}
        assert httpx.get(f"http://127.0.0.1:{ports['mlflow']}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ports['prefect']}/api/health").status_code == 200
        # MLflow asks for credentials; the first admin key (made while MLflow was still starting) signs in.
        mlflow = f"http://127.0.0.1:{ports['mlflow']}/api/2.0/mlflow/experiments/search?max_results=5"
        assert httpx.get(mlflow).status_code == 401
        admin_auth = (key.group(1).split("_")[1], key.group(1))
        deadline = time.monotonic() + 60
        while httpx.get(mlflow, auth=admin_auth).status_code != 200:
            assert time.monotonic() < deadline, "the admin key never signed in to MLflow"
            time.sleep(0.5)
        headers = {"X-API-Key": key.group(1)}
        created = httpx.post(f"http://127.0.0.1:{ports['api']}/api/v1/projects", json={"name": "demo"}, headers=headers)
        assert created.status_code == 201
        if shutil.which("prometheus"):  # scripts/test installs it; then up starts it and it scrapes all three
            assert f"Prometheus http://127.0.0.1:{ports['prometheus']}" in out
            url = f"http://127.0.0.1:{ports['prometheus']}/api/v1/targets"
            deadline = time.monotonic() + 60
            while True:
                targets = httpx.get(url, timeout=5).json()["data"]["activeTargets"]
                health = {t["labels"]["job"]: t["health"] for t in targets}
                if set(health.values()) == {"up"} or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert health == {"miniml-api": "up", "miniml-inference": "up", "miniml-worker": "up"}, targets
        else:
            assert "Prometheus not installed" in out
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("worker" in " ".join(c.cmdline()) for c in children)
        assert len(children) >= 4
    finally:
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopped" in rest
    # Private data folder; no secret in any log the platform wrote.
    data = tmp_path / "data"
    loose = [
        (str(p), oct(p.stat().st_mode & 0o777))
        for p in data.rglob("*")
        if not p.is_symlink() and p.exists() and p.stat().st_mode & 0o077
    ]
    assert loose == [], loose
    assert data.stat().st_mode & 0o777 == 0o700
    found = [data / n for n in ("admin.key", "worker.key", "inference.key", "mlflow.password", "signing.key")]
    secret_values = [p.read_text().strip() for p in found if p.exists()]
    assert len(secret_values) >= 4
    for log in (data / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert not any(v in text for v in secret_values), f"a secret is in {log.name}"
    time.sleep(0.5)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], [c.cmdline() for c in alive]

    # A second `up` on the same folder keeps every piece of data, and prints no new key.
    proc = _start(tmp_path, ports)
    try:
        out = _read_until(proc, r"Press Ctrl-C", 180)
        assert "admin key  in" in out
        listed = httpx.get(f"http://127.0.0.1:{ports['api']}/api/v1/projects", headers=headers)
        assert [p["name"] for p in listed.json()] == ["demo"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_up_names_a_taken_port(tmp_path: Path) -> None:
    ports = {name: free_port() for name in SERVICES}
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports["prefect"]))
        blocker.listen(1)
        proc = _start(tmp_path, ports)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"Port {ports['prefect']}" in out and "prefect" in out
    assert not (tmp_path / "data" / "miniml.db").exists()
