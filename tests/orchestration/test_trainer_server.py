"""The worker's trainer server: jobs' trainers fork from one process that imported the training
stack once; a trainer it forks behaves as a spawned one (own session, killed by group, named in
ps), and a runner that cannot use it (none, gone, another thread budget) spawns the trainer."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import psutil
import pytest

from miniml.orchestration.trainer import SERVER_ENV, Trainer, start_server, thread_budget, wait_server


@pytest.fixture
def server(trainer_server: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """The session's server (tests/conftest.py), once it listens."""
    _wait_listening(os.environ[SERVER_ENV])
    return trainer_server


@pytest.fixture
def own_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen[bytes]]:
    monkeypatch.delenv(SERVER_ENV, raising=False)
    proc = start_server(0)
    name = os.environ[SERVER_ENV]
    monkeypatch.setenv(SERVER_ENV, name)  # undone after the test (start_server set it outright)
    try:
        _wait_listening(name)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_listening(name: str) -> None:
    assert wait_server(name, 120), "the trainer server never listened"


def test_a_forked_trainer_is_its_own_group_named_for_its_job(server: subprocess.Popen[bytes]) -> None:
    trainer = Trainer(7, platform="/srv/miniml-a")
    child = psutil.Process(trainer.process.pid)
    assert child.ppid() == server.pid
    assert os.getpgid(child.pid) == child.pid  # a session of its own: killing its group kills its trials
    title = " ".join(child.cmdline()).split()
    assert "miniml.orchestration.trainer" in title and "job-7" in title and "/srv/miniml-a" in title
    assert trainer.stop() == -signal.SIGKILL  # the server reaped it and said how it ended
    assert not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE


def test_a_trainer_whose_runner_goes_away_ends(server: subprocess.Popen[bytes]) -> None:
    trainer = Trainer(8)
    assert trainer.process.stdin is not None
    trainer.process.stdin.close()  # the runner died before it sent the job
    assert trainer.process.wait() != 0
    assert trainer.receive(timeout=10) == ("eof",)


def test_another_thread_budget_or_no_server_spawns_the_trainer(
    server: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    cores = os.cpu_count() or 1
    other = next(t for t in range(1, cores + 2) if thread_budget(t) != thread_budget(0))
    with Trainer(9, trial_threads=other) as spawned:
        assert isinstance(spawned.process, subprocess.Popen)
        assert psutil.Process(spawned.process.pid).ppid() == os.getpid()
        assert (
            psutil.Process(spawned.process.pid).environ()["OMP_NUM_THREADS"] == thread_budget(other)["OMP_NUM_THREADS"]
        )
    monkeypatch.setenv(SERVER_ENV, "miniml-trainer-no-such-server")
    with Trainer(10) as spawned:
        assert isinstance(spawned.process, subprocess.Popen)


def test_the_server_outlives_its_worker_until_its_trainers_end(own_server: subprocess.Popen[bytes]) -> None:
    """The worker's pipe closing (it died) stops new forks; a trainer still running is reaped and reported."""
    server = own_server
    trainer = Trainer(11)
    assert server.stdin is not None
    server.stdin.close()
    time.sleep(0.5)
    assert server.poll() is None  # still there for its trainer
    assert trainer.stop() == -signal.SIGKILL
    assert server.wait(timeout=30) == 0
    with Trainer(12) as spawned:  # nobody to fork from now
        assert isinstance(spawned.process, subprocess.Popen)


def test_wait_server_is_true_once_the_server_listens_and_false_for_none() -> None:
    assert wait_server(os.environ[SERVER_ENV], 120)  # the session's server (tests/conftest.py)
    assert not wait_server("miniml-trainer-no-such-server", 0.5)
