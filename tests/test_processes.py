"""The supervisor behind `miniml up`, on real short-lived processes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from miniml.config import Settings
from miniml.processes import CrashLoop, Service, Supervisor, describe_exit


def _supervisor(tmp_path: Path, code: str, **kwargs: float) -> Supervisor:
    settings = Settings(data_dir=tmp_path)
    service = Service(name="flaky", argv=[sys.executable, "-c", code], port=None, health_url=None)
    return Supervisor(settings, [service], **kwargs)  # type: ignore[arg-type]


def _until(sup: Supervisor, done: str, timeout_s: float = 30) -> list[str]:
    events: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events += sup.supervise()
        if any(done in e for e in events):
            return events
        time.sleep(0.05)
    raise AssertionError(f"never saw {done!r}: {events}")


def test_a_child_that_exits_is_restarted_with_backoff_and_shown(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    # Each run appends a line; the first two exit at once with code 3, later ones keep running.
    code = (
        f"import pathlib,sys,time; p=pathlib.Path({str(marker)!r}); n=len(p.read_text().splitlines()) "
        "if p.exists() else 0; p.write_text('x\\n'*(n+1)); sys.exit(3) if n < 2 else time.sleep(60)"
    )
    sup = _supervisor(tmp_path, code, backoff_s=0.2)
    try:
        sup.start_all()
        events = _until(sup, "restarted (pid", 10)
        events += _until(sup, "restart 2)", 10)
        assert "flaky exited (code 3); restarting in 0s" in events[0]
        deadline = time.monotonic() + 10
        while marker.read_text().count("x") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert marker.read_text().count("x") == 3
        assert sup.supervise() == []  # the third run stays up: no more restarts
        shown = json.loads((tmp_path / "up.json").read_text())
        (child,) = shown["children"]
        assert (child["state"], child["restarts"], child["last_exit"]) == ("running", 2, "code 3")
        assert child["pid"] == sup.procs["flaky"].pid
    finally:
        sup.stop_all(timeout_s=2)
    assert json.loads((tmp_path / "up.json").read_text())["state"] == "stopped"


def test_a_child_that_keeps_dying_is_a_crash_loop(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "import sys; sys.exit(7)", backoff_s=0.05, max_backoff_s=0.1, max_restarts=3)
    try:
        sup.start_all()
        with pytest.raises(CrashLoop) as caught:
            _until(sup, "never", 20)
    finally:
        sup.stop_all(timeout_s=2)
    assert "flaky exited 4 times within 60s (last: code 7); stopping the platform" in caught.value.detail
    assert "flaky.log" in caught.value.detail
    assert sup.children["flaky"].restarts == 3


def test_exits_are_described() -> None:
    assert describe_exit(0) == "code 0"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-15) == "killed by SIGTERM"
