"""`miniml up` keeps the platform running when one of its processes dies.

Each child is killed (SIGKILL) or stopped (SIGTERM) while a training job runs and predictions
flow: the child comes back, predictions keep flowing (a failure is allowed only while the
inference service itself restarts), the job ends in a real state, and its MLflow run matches it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from sklearn.datasets import load_iris

from miniml.sdk.client import Client
from tests.conftest import free_port
from tests.test_up import SERVICES, _read_until, _start

pytestmark = pytest.mark.slow


def _status(data: Path) -> dict[str, dict[str, Any]]:
    body = json.loads((data / "up.json").read_text())
    return {c["name"]: c for c in body["children"]}


def _wait_back(data: Path, name: str, restarts: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        child = _status(data)[name]
        if child["restarts"] > restarts and child["state"] == "running":
            return
        time.sleep(0.3)
    raise AssertionError(f"{name} did not come back: {_status(data)[name]}")


class Load(threading.Thread):
    """Steady predictions; each failure is kept with its time."""

    def __init__(self, url: str, key: str, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key, self.endpoint = url, key, endpoint
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.served = threading.Event()

    def run(self) -> None:
        row = {"sepal length (cm)": 5.1, "sepal width (cm)": 3.5, "petal length (cm)": 1.4, "petal width (cm)": 0.2}
        with httpx.Client(base_url=self.url, headers={"X-API-Key": self.key}, timeout=30) as http:
            while not self.stop.is_set():
                try:
                    response = http.post(f"/v1/endpoints/{self.endpoint}/predict", json={"rows": [row]})
                    if response.status_code == 200:
                        self.ok += 1
                        self.served.set()
                    else:
                        self.failures.append((time.monotonic(), f"{response.status_code} {response.text[:200]}"))
                except httpx.HTTPError as exc:
                    self.failures.append((time.monotonic(), type(exc).__name__))
                time.sleep(0.05)


def test_every_child_comes_back_and_predictions_keep_flowing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = {name: free_port() for name in SERVICES}
    data = tmp_path / "data"
    proc = _start(tmp_path, ports)
    load: Load | None = None
    try:
        out = _read_until(proc, r"Press Ctrl-C", 180)
        key = (data / "admin.key").read_text().strip()
        api, inference = f"http://127.0.0.1:{ports['api']}", f"http://127.0.0.1:{ports['inference']}"
        client = Client(api, api_key=key)
        client.projects.create("demo")
        csv = tmp_path / "iris.csv"
        load_iris(as_frame=True).frame.to_csv(csv, index=False)
        client.datasets.upload("demo", csv)
        first = client.jobs.create("demo", dataset="iris", target="target", families=["linear"], max_trials=2)
        assert client.jobs.wait("demo", first.id, timeout_s=300).state == "succeeded"
        client.deployments.create("demo", "flowers", "iris", target="staging")
        client.deployments.wait_ready("demo", "flowers")

        load = Load(inference, key, "flowers")
        load.start()
        job = client.jobs.create("demo", dataset="iris", target="target", families=["random_forest"], max_trials=30)
        allowed: list[tuple[float, float]] = []  # windows in which inference itself restarted
        for name, sig in [
            ("api", signal.SIGTERM),
            ("inference", signal.SIGTERM),
            ("worker", signal.SIGKILL),
            ("mlflow", signal.SIGKILL),
            ("prefect", signal.SIGKILL),
            ("api", signal.SIGKILL),
            ("inference", signal.SIGKILL),
            ("worker", signal.SIGTERM),
            ("mlflow", signal.SIGTERM),
            ("prefect", signal.SIGTERM),
        ]:
            child = _status(data)[name]
            began = time.monotonic()
            os.kill(child["pid"], sig)
            _wait_back(data, name, child["restarts"])
            if name == "inference":  # its window lasts until it serves again (it loads the model first)
                load.served.clear()
                assert load.served.wait(60), f"predictions did not resume: {load.failures[-3:]}"
                allowed.append((began, time.monotonic()))
            time.sleep(1)  # traffic on the restarted platform before the next fault

        load.served.clear()
        assert load.served.wait(30), f"predictions did not resume: {load.failures[-3:]}"
        load.stop.set()
        load.join(timeout=30)
        outside = [(t, why) for t, why in load.failures if not any(a <= t <= b for a, b in allowed)]
        assert outside == [], outside
        assert load.ok > 200

        # The job ends in a real state (it may finish, or fail when its worker was killed) and
        # its MLflow run says the same.
        ended = client.jobs.wait("demo", job.id, timeout_s=300)
        assert ended.state in ("succeeded", "failed", "cancelled"), ended
        # Its MLflow run ends in the matching status (the api's supervisor settles what a killed
        # worker left open, within a few of its rounds).
        tracking = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{ports['mlflow']}")
        expected = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}[ended.state]
        # This platform's MLflow login is the key's; the session's own servers keep theirs after the test.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", key.split("_")[1])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", key)
        deadline = time.monotonic() + 60
        while ended.mlflow_run_id and tracking.get_run(ended.mlflow_run_id).info.status != expected:
            assert time.monotonic() < deadline, tracking.get_run(ended.mlflow_run_id).info.status
            time.sleep(1)

        status = _status(data)
        assert all(c["state"] == "running" for c in status.values()), status
        assert status["api"]["restarts"] == 2 and status["api"]["last_exit"] == "killed by SIGKILL"
        assert httpx.get(f"{api}/healthz").status_code == 200
        # `miniml status` shows the same: every process running, the api restarted twice.
        env = os.environ | {"MINIML_DATA_DIR": str(data), "COLUMNS": "200"}
        shown = subprocess.run(
            [sys.executable, "-m", "miniml", "status"], check=False, env=env, capture_output=True, text=True
        )
        assert shown.returncode == 0, shown.stderr
        api_line = next(line for line in shown.stdout.splitlines() if line.strip("│ ").startswith("api "))
        assert "running" in api_line and "killed by SIGKILL" in api_line, shown.stdout
        raw = subprocess.run(
            [sys.executable, "-m", "miniml", "status", "--json"], check=False, env=env, capture_output=True
        )
        assert {c["name"]: c["restarts"] for c in json.loads(raw.stdout)["children"]}["inference"] == 2
    finally:
        if load is not None:
            load.stop.set()
        os.kill(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out + rest
    assert "api exited (code 0); restarting" in rest  # SIGTERM: it drained and exited cleanly
    assert "worker exited (killed by SIGKILL)" in rest
    env = os.environ | {"MINIML_DATA_DIR": str(data)}
    after = subprocess.run(
        [sys.executable, "-m", "miniml", "status"], check=False, env=env, capture_output=True, text=True
    )
    assert after.returncode == 1 and "stopped" in after.stdout
