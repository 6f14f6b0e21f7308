"""The child process a training job's search and refit run in, so that stopping it stops them.

A fit cannot be interrupted from Python: scikit-learn, LightGBM, XGBoost and torch run native
code on threads of their own for as long as it takes. So the runner trains each job (each shard
of one) in a child process in its own session, and stops the job's work by killing that process
group: within a heartbeat of a cancel, whatever the trials are doing. One child per job, not per
trial: its imports take seconds, a trial may take milliseconds.

The runner writes a pickled ``TrainRequest`` to the child's stdin and keeps stdin open; the
child answers on a pipe of its own (its descriptor in argv) with pickled messages:

    ("commit",)          refit done, about to register the model: waits for "go" on stdin
    ("done", job)        the job ended (None: another shard refits and registers)
    ("cancelled",)       the child saw the cancel itself
    ("failed", reason)   an error, as a user may read it (the traceback goes to the worker's log)

A child told to go is not killed for a cancel any more: a model half registered is worse than a
cancel that came too late. A child whose stdin closes (its runner ended, died or was killed)
kills its own process group: no trial outlives its worker.

A fresh interpreter spends seconds of CPU importing MLflow, scikit-learn, Optuna, skops and torch
before its first trial. So ``miniml worker`` keeps a trainer server (``serve``): one process that
has imported them once, under the worker's thread budget, and forks a trainer for each job. The
runner hands it the child's pipes (``send_fds``) and gets the pid, then the exit code; the child
is the same as a spawned one (own session, killed by group, named ``job-<id>`` in ``ps``). Without a
server, or when it is gone or runs another thread budget, the runner spawns the child as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import queue
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from miniml.config import Settings
from miniml.cores import available_cores
from miniml.schemas.jobs import JobRead

log = logging.getLogger("miniml.worker")
GO = "go"
SERVER_ENV = "MINIML_TRAINER_SERVER"
# What a job's trainer imports before its first trial, loaded once by the server (skops pulls torch).
PRELOAD = (
    "miniml.orchestration.runner",
    "miniml.sdk.client",
    "miniml.tracking.runs",
    "miniml.training.search",
    "miniml.training.families",
    "miniml.training.estimators",
    "sklearn.ensemble",
    "lightgbm",
    "xgboost",
    "skops.io",
    "torch",
    "mlflow.sklearn",
    "mlflow.pyfunc",
    # Optuna's RDB storage loads these when a job opens its study (0.4 s per job otherwise).
    "optuna.storages._rdb.storage",
    "alembic.command",
    "alembic.config",
    "alembic.migration",
    "alembic.script",
    "alembic.runtime.environment",
    "sqlalchemy.orm",
    "pyarrow.pandas_compat",
)


@dataclass
class TrainRequest:
    api_url: str
    api_key: str | None
    settings: Settings
    job: JobRead
    run_id: str
    worker: str
    shard: int


class Trainer:
    """The runner's side of one job's child process."""

    def __init__(self, job_id: int, *, trial_threads: int = 0, platform: str = "") -> None:
        # The job id and the platform's data folder in argv name the process in ps and in the
        # tests' process checks (job ids repeat across platforms on one machine).
        argv = [sys.executable, "-m", "miniml.orchestration.trainer", "", f"job-{job_id}", platform]
        env = os.environ | thread_budget(trial_threads)
        read_fd, write_fd = os.pipe()
        try:
            server = os.environ.get(SERVER_ENV)
            forked = _fork_from_server(server, argv, env, write_fd) if server else None
            if forked is not None:
                self.process: subprocess.Popen[bytes] | _Forked = forked
            else:
                argv[3] = str(write_fd)
                self.process = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, pass_fds=(write_fd,), start_new_session=True, env=env
                )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.messages: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(read_fd,), name=f"trainer-{job_id}", daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            while True:
                try:
                    message = pickle.load(pipe)  # noqa: S301 (our own child, over our own pipe)
                except Exception:  # end of the pipe, or a message cut off by a kill
                    self.messages.put(("eof",))
                    return
                self.messages.put(message)

    def send(self, message: object) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            pickle.dump(message, stdin)
            stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the child is gone; its end of the pipe says so to the reader

    def receive(self, timeout: float) -> tuple[Any, ...] | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> int:
        """Kill the child and everything it started (its process group); return its exit code.

        The group is killed before the child is reaped: until then its id cannot name another group.
        """
        with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        if self.process.returncode is None:
            self.stop()


def thread_budget(trial_threads: int, cores: int | None = None) -> dict[str, str]:
    """The environment that gives each of ``trial_threads`` parallel trials ``cores / trial_threads``
    threads in every library (OpenMP: HistGradientBoosting, torch; BLAS), read when each loads: the
    machine runs as many threads as it has cores, not trials times cores. (LightGBM and XGBoost take
    ``n_jobs=1`` from their families.) The refit, alone, raises the limit again (``search.refit``)."""
    cores = cores or available_cores()
    trials = trial_threads or cores
    per_trial = str(max(1, cores // trials))
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
    return dict.fromkeys(names, per_trial) | {"MINIML_REFIT_THREADS": str(cores)}


def _watch_runner(go: threading.Event, runner: IO[bytes]) -> None:
    """Hear "go" from the runner; when the runner is gone, end this process group."""
    while True:
        try:
            message = pickle.load(runner)  # noqa: S301 (from our own runner)
        except Exception:
            os.killpg(os.getpgrp(), signal.SIGKILL)
            return
        if message == GO:
            go.set()


def _send(out: IO[bytes], message: tuple[Any, ...]) -> None:
    pickle.dump(message, out)
    out.flush()


def main(argv: list[str], runner: IO[bytes] | None = None) -> None:
    """Train the job the runner sends on ``runner`` (stdin), answering on the descriptor in argv[1]."""
    from miniml import logs
    from miniml.errors import public_reason
    from miniml.orchestration.runner import train
    from miniml.sdk.client import Client
    from miniml.tracking.runs import Tracker
    from miniml.training.search import Cancelled

    runner = runner or sys.stdin.buffer
    out = os.fdopen(int(argv[1]), "wb")
    request: TrainRequest = pickle.load(runner)  # noqa: S301 (from our own runner)
    logs.configure(request.settings.log_level)
    go = threading.Event()
    threading.Thread(target=_watch_runner, args=(go, runner), name="runner-watch", daemon=True).start()

    def commit() -> None:
        _send(out, ("commit",))
        go.wait()

    job = request.job
    client = Client(
        request.api_url, api_key=request.api_key, timeout=60, outlast_s=request.settings.worker.outlast_api_s
    )
    try:
        tracker = Tracker(request.settings.mlflow_uri)
        result = train(
            client, request.settings, tracker, job, request.run_id, request.worker, request.shard, commit=commit
        )
        message: tuple[Any, ...] = ("done", result)
    except Cancelled:
        message = ("cancelled",)
    except Exception as exc:
        log.error("job failed", extra={"job_id": job.id, "trace": traceback.format_exc()[-4000:]})
        message = ("failed", public_reason(exc))
    _send(out, message)
    out.close()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(0)  # no waiting on library threads (Optuna's heartbeat, MLflow's async logging)


class _Forked:
    """A trainer the server forked: what the runner uses of ``Popen`` (pid, stdin, wait, returncode)."""

    def __init__(self, conn: socket.socket, pid: int, stdin: IO[bytes]) -> None:
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin
        self.returncode: int | None = None
        self._conn = conn

    def wait(self) -> int:
        """The exit code the server reports once it has reaped the child (negative: the signal)."""
        if self.returncode is None:
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := self._conn.recv(64):
                    answer += chunk
            self._conn.close()
            try:
                self.returncode = int(answer)
            except ValueError:  # the server died first: the child, in its own session, goes on alone
                while _alive(self.pid):
                    time.sleep(0.1)
                self.returncode = -signal.SIGKILL
        return self.returncode


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _fork_from_server(name: str, argv: list[str], env: dict[str, str], out_fd: int) -> _Forked | None:
    """Ask the worker's trainer server for a child; None when there is none to ask or it says no."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child_in, stdin_fd = os.pipe()
    try:
        conn.settimeout(10)
        conn.connect("\0" + name)
        request = json.dumps({"argv": argv, "env": env}).encode()
        socket.send_fds(conn, [request], [child_in, out_fd, 1, 2])
        pid = int(conn.recv(64) or b"0")
        if pid <= 0:
            raise ConnectionRefusedError("the trainer server did not fork")
        conn.settimeout(None)
    except (OSError, ValueError) as exc:
        conn.close()
        os.close(stdin_fd)
        log.debug("no trainer server; spawning the trainer", extra={"server": name, "why": str(exc)})
        return None
    finally:
        os.close(child_in)
    return _Forked(conn, pid, os.fdopen(stdin_fd, "wb"))


def start_server(trial_threads: int) -> subprocess.Popen[bytes]:
    """Start this worker's trainer server and name it in the environment the runner sees.

    It lives as long as its stdin (this process's pipe to it) is open, then until its last child ends.
    """
    name = f"miniml-trainer-{os.getpid()}-{secrets.token_hex(8)}"
    server = subprocess.Popen(
        [sys.executable, "-m", "miniml.orchestration.trainer", "--serve", name],
        stdin=subprocess.PIPE,
        env=os.environ | thread_budget(trial_threads),
    )
    os.environ[SERVER_ENV] = name
    return server


def wait_server(name: str, timeout_s: float) -> bool:
    """True once the trainer server ``name`` listens (its imports done): a job that starts before
    that spawns its trainer, seconds slower."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # abstract sockets are listed with a leading @
            if f"@{name}" in Path("/proc/net/unix").read_text():
                return True
        time.sleep(0.2)
    return False


def serve(name: str) -> None:
    """The trainer server: import what trainers need, then fork one per request until stdin closes.

    One thread only (a fork copies no other thread's half-held lock); children are reaped in the
    same loop and their exit codes sent to whoever asked for them.
    """
    import importlib

    import setproctitle

    # Its first call takes over the memory of argv and environ, before the trainers change either.
    setproctitle.setproctitle(" ".join([sys.executable, "-m", "miniml.orchestration.trainer", "--serve", name]))
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    budget = {k: os.environ.get(k) for k in thread_budget(1)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the worker; this ends with its pipe
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind("\0" + name)
    listener.listen(16)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that asked for it
    open_ = True
    while open_ or waiting:
        ready: list[Any] = []
        if open_:
            ready = select.select([listener, sys.stdin], [], [], 0.2)[0]
        else:
            time.sleep(0.2)
        if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
            open_ = False  # the worker is gone: no new trainers; the running ones finish
            listener.close()
        elif listener in ready:
            conn = listener.accept()[0]
            pid = _fork_one(conn, listener, waiting, budget)
            if pid:
                waiting[pid] = conn
            else:
                conn.close()
        with contextlib.suppress(ChildProcessError):
            while (reaped := os.waitpid(-1, os.WNOHANG))[0]:
                asked = waiting.pop(reaped[0], None)
                if asked is not None:
                    with contextlib.suppress(OSError):
                        asked.sendall(str(os.waitstatus_to_exitcode(reaped[1])).encode())
                    asked.close()


def _fork_one(
    conn: socket.socket, listener: socket.socket, waiting: dict[int, socket.socket], budget: dict[str, str | None]
) -> int:
    """Fork the trainer ``conn`` asks for; 0 when it may not have one (another user, another budget)."""
    fds: list[int] = []
    try:
        conn.settimeout(5)
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        message, fds, _flags, _addr = socket.recv_fds(conn, 1 << 20, 4)
        request = json.loads(message)
        env: dict[str, str] = request["env"]
        if uid != os.getuid() or len(fds) != 4 or any(env.get(k) != v for k, v in budget.items()):
            conn.send(b"0")
            return 0
        settled, settling = os.pipe()
        pid = os.fork()
        if pid == 0:  # the trainer
            try:
                os.close(settled)
                listener.close()
                for other in [conn, *waiting.values()]:
                    other.close()
                _become_trainer(request["argv"], env, fds, settling)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(settling)
        # The pid goes out once the child leads its own group: a kill of that group must reach it.
        with os.fdopen(settled, "rb") as ready:
            ready.read(1)
        conn.send(str(pid).encode())
        return pid
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("trainer request refused", extra={"why": str(exc)})
        return 0
    finally:
        for fd in fds:
            os.close(fd)


def _become_trainer(argv: list[str], env: dict[str, str], fds: list[int], settling: int) -> None:
    import setproctitle

    runner_fd, out_fd, stdout_fd, stderr_fd = fds
    setproctitle.setproctitle(" ".join([*argv[:3], str(out_fd), *argv[4:]]))
    os.setsid()
    os.write(settling, b"1")
    os.close(settling)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    os.dup2(runner_fd, 0)  # as a spawned trainer: its stdin is the runner's pipe
    os.environ.clear()
    os.environ.update(env)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    main(["trainer", str(out_fd)], os.fdopen(0, "rb", closefd=False))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2])
    else:
        main(sys.argv)
