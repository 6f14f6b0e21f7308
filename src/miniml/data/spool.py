"""A file that one writer is still appending to while readers follow it.

An upload is written to a temp file as its bytes arrive; with a spool, the profile (and an S3
upload) can read the same file at the same time instead of waiting for the last byte. A reader
that gets ahead of the writer waits; when the writer fails (a disconnect, an upload over the
limit), every waiting reader raises ``SpoolFailed`` at once.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

_NEVER = 1 << 62


class SpoolFailed(Exception):
    """The writer gave up: the file will never be complete."""


class Spool:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or Path()  # set by the writer before its first byte
        self.filename = ""  # the client's file name, known once the part's headers are read
        self.written = 0
        self.done = False
        self.failed = False
        self._cond = threading.Condition()
        self._wanted = _NEVER  # the fewest bytes a waiting reader needs: wake readers only then

    # The writer's side.

    def wrote(self, total: int) -> None:
        """The first ``total`` bytes are on disk (flushed)."""
        with self._cond:
            self.written = total
            if total >= self._wanted:
                self._wanted = _NEVER
                self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self.failed = True
            self._cond.notify_all()

    # The readers' side.

    def wait_for(self, size: int) -> int:
        """Wait until ``size`` bytes exist or the file is complete; return how many exist."""
        with self._cond:
            while not self.failed and not self.done and self.written < size:
                self._wanted = min(self._wanted, size)
                self._cond.wait()
            if self.failed:
                raise SpoolFailed("the upload ended before its last byte")
            return self.written

    def wait_done(self) -> int:
        """Wait for the whole file; return its size."""
        return self.wait_for(_NEVER)

    def reader(self) -> io.BufferedReader:
        """A file object over the bytes written so far and to come (seekable, for rereads)."""
        return io.BufferedReader(_Reader(self), buffer_size=1 << 16)


class _Reader(io.RawIOBase):
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.fd = os.open(spool.path, os.O_RDONLY)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        else:  # from the end: only once there is an end
            self.pos = self.spool.wait_done() + offset
        return self.pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = len(buffer)
        # Whole reads where the writer is ahead: a short read only at the end of the file.
        available = self.spool.wait_for(self.pos + want)
        n = max(0, min(want, available - self.pos))
        if n == 0:
            return 0
        data = os.pread(self.fd, n, self.pos)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


__all__ = ["Spool", "SpoolFailed"]
