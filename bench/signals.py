"""A bench stopped with SIGTERM (``timeout``, a CI runner, ``kill``) stops the platform it started."""

from __future__ import annotations

import signal
import sys


def stop_on_sigterm() -> None:
    """SIGTERM ends the bench as Ctrl-C would: the ``finally`` that stops the platform's processes
    runs (a signal's default action skips it and leaves them running)."""

    def end(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, end)
    if sys.platform != "win32":
        signal.signal(signal.SIGHUP, end)
