"""Graceful drain for the api and inference servers.

On SIGTERM a server first reports not ready (``/readyz`` 503) while it keeps serving for
``drain_s`` — long enough for a load balancer or Kubernetes to stop sending it traffic — and only
then lets uvicorn stop: it stops listening, finishes the requests in flight (bounded by its
graceful-shutdown timeout) and exits 0. A second SIGTERM during the drain changes nothing; SIGINT
(Ctrl-C) stops without the drain.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from types import FrameType
from typing import Any


class Drain:
    """Whether this server is draining; ``install`` runs inside uvicorn's lifespan startup."""

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self.draining = False

    def install(self) -> None:
        """Wrap the SIGTERM handler uvicorn installed for this server process."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals are only handled on the main thread (tests run servers on others)
        stop = signal.getsignal(signal.SIGTERM)
        if not callable(stop):
            return
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if self.draining:
                return
            self.draining = True
            loop.call_soon_threadsafe(loop.call_later, self.drain_s, stop, signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)

    def body(self) -> dict[str, Any]:
        return {"status": "draining", "detail": "shutting down: finishing requests in flight, taking no new work"}
