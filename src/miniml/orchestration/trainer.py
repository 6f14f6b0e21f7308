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
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import IO, Any

from miniml.config import Settings
from miniml.schemas.jobs import JobRead

log = logging.getLogger("miniml.worker")
GO = "go"


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
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                # The job id and the platform's data folder in argv name the process in ps and in
                # the tests' process checks (job ids repeat across platforms on one machine).
                [sys.executable, "-m", "miniml.orchestration.trainer", str(write_fd), f"job-{job_id}", platform],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                start_new_session=True,
                env=os.environ | thread_budget(trial_threads),
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
    cores = cores or os.cpu_count() or 1
    trials = trial_threads or cores
    per_trial = str(max(1, cores // trials))
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS")
    return dict.fromkeys(names, per_trial) | {"MINIML_REFIT_THREADS": str(cores)}


def _watch_runner(go: threading.Event) -> None:
    """Hear "go" from the runner; when the runner is gone, end this process group."""
    while True:
        try:
            message = pickle.load(sys.stdin.buffer)  # noqa: S301 (from our own runner)
        except Exception:
            os.killpg(os.getpgrp(), signal.SIGKILL)
            return
        if message == GO:
            go.set()


def _send(out: IO[bytes], message: tuple[Any, ...]) -> None:
    pickle.dump(message, out)
    out.flush()


def main(argv: list[str]) -> None:
    from miniml import logs
    from miniml.errors import public_reason
    from miniml.orchestration.runner import train
    from miniml.sdk.client import Client
    from miniml.tracking.runs import Tracker
    from miniml.training.search import Cancelled

    out = os.fdopen(int(argv[1]), "wb")
    request: TrainRequest = pickle.load(sys.stdin.buffer)  # noqa: S301 (from our own runner)
    logs.configure(request.settings.log_level)
    go = threading.Event()
    threading.Thread(target=_watch_runner, args=(go,), name="runner-watch", daemon=True).start()

    def commit() -> None:
        _send(out, ("commit",))
        go.wait()

    job = request.job
    client = Client(request.api_url, api_key=request.api_key, timeout=60)
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


if __name__ == "__main__":
    main(sys.argv)
