"""SIGTERM drains the api: /readyz answers 503 at once, requests in flight finish, the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow


def _slow_upload(seconds: float) -> tuple[Iterator[bytes], str]:
    boundary = "drainboundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.csv"\r\n'
            "Content-Type: text/csv\r\n\r\nx,y\r\n"
        ).encode()
        steps = int(seconds / 0.1)
        for i in range(steps):
            time.sleep(0.1)
            yield f"{i},{i % 2}\r\n".encode()
        yield f"--{boundary}--\r\n".encode()

    return body(), f"multipart/form-data; boundary={boundary}"


def test_sigterm_flips_readyz_finishes_in_flight_requests_and_exits_0(tmp_path: Path) -> None:
    port = free_port()
    env = os.environ | {
        "MINIML_DATA_DIR": str(tmp_path / "data"),
        "MINIML_API__PORT": str(port),
        "MINIML_API__DRAIN_S": "2",
        "MINIML_MLFLOW__AUTH": "false",
        "MINIML_MLFLOW__PORT": str(free_port()),
        "MINIML_PREFECT__PORT": str(free_port()),
    }
    proc = subprocess.Popen([sys.executable, "-m", "miniml", "api"], env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the api did not start"
            time.sleep(0.2)
        headers = {"X-API-Key": (tmp_path / "data" / "admin.key").read_text().strip()}
        assert httpx.post(f"{url}/api/v1/projects", json={"name": "demo"}, headers=headers).status_code == 201
        before = httpx.get(f"{url}/readyz", timeout=10)
        assert before.json()["status"] != "draining"

        answers: list[httpx.Response] = []
        body, content_type = _slow_upload(5.0)

        def upload() -> None:
            answers.append(
                httpx.post(
                    f"{url}/api/v1/projects/demo/datasets",
                    content=body,
                    headers=headers | {"Content-Type": content_type},
                    timeout=60,
                )
            )

        thread = threading.Thread(target=upload)
        thread.start()
        time.sleep(1.0)  # the upload is in flight
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        during = httpx.get(f"{url}/readyz", timeout=5)
        assert during.status_code == 503
        assert during.json()["status"] == "draining"
        assert during.headers["Retry-After"]
        # Still serving during the drain window: a short request answers normally.
        assert httpx.get(f"{url}/api/v1/projects", headers=headers, timeout=5).status_code == 200
        thread.join(timeout=60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (answer,) = answers
    assert answer.status_code == 201, answer.text
    assert answer.json()["rows"] == 50
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=2)
