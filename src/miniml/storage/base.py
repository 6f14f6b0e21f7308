from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol


class ObjectStore(Protocol):
    """Keys are built by miniml from validated names and ids, never from a user's raw string."""

    #: True when storing means sending the bytes elsewhere (S3): worth doing while other work runs.
    remote: bool

    def prepare(self) -> None:
        """Create what the store needs (folder, bucket); called once when a process starts."""

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        """Store a local file under ``key`` (S3: multipart for large files).

        ``move=True``: the caller is done with the file; a local store may rename it into place
        instead of copying it (the file is gone afterwards). A remote store leaves it alone.
        """

    def put_growing(self, key: str, path: Path, wait_for: Callable[[int], int], *, size_hint: int) -> None:
        """Store a file that is still being written (an upload in progress).

        ``wait_for(n)`` blocks until the file holds ``n`` bytes or is complete, and returns how many
        it holds; it raises when the writer gave up, and then nothing may stay stored.
        ``size_hint``: at least the final size (it sizes S3's parts).
        """

    def iter_bytes(self, key: str, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object's bytes."""

    def download(self, key: str, path: Path) -> None:
        """Copy an object to a local file."""

    def open_local(self, key: str) -> AbstractContextManager[Path]:
        """A local path holding the object's bytes for the duration of the block."""

    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing one is not an error."""

    def exists(self, key: str) -> bool: ...

    def list_keys(self, prefix: str = "") -> list[str]: ...

    def uri(self, key: str) -> str:
        """The object's URI: file:///… locally, s3://bucket/… on S3."""

    def key_for_uri(self, uri: str) -> str | None:
        """The key a URI of this store names, or None when it names anything else."""
