from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from miniml.errors import NotFound

MISSING = "The stored file is missing from the object store; upload the data again."


class LocalStore:
    """Objects as files under one root folder. Writes land by rename, so a reader never sees half a file."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        # Keys are built by the code, but a wrong one must still never leave the root.
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"object key {key!r} leaves the store")
        return path

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            try:
                os.replace(path, dest)  # same file system: a rename, no bytes copied
                return
            except OSError:
                pass  # another file system: copy below
        tmp = dest.with_name(dest.name + ".part")
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def put_growing(self, key: str, path: Path, wait_for: Callable[[int], int], *, size_hint: int) -> None:
        """A file still being written: copied once it is complete (a local store gains nothing sooner)."""
        wait_for(1 << 62)
        self.put_file(key, path)

    def iter_bytes(self, key: str, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(MISSING)
        with path.open("rb") as fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def download(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(MISSING)
        shutil.copyfile(src, path)

    @contextmanager
    def open_local(self, key: str) -> Iterator[Path]:
        path = self._path(key)
        if not path.is_file():
            raise NotFound(MISSING)
        yield path

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        folder = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root  # walk only below it
        if not folder.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in folder.rglob("*")
            if p.is_file() and str(p.relative_to(self.root)).startswith(prefix)
        )

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def key_for_uri(self, uri: str) -> str | None:
        prefix = self.root.as_uri() + "/"
        if not uri.startswith(prefix):
            return None
        key = uri[len(prefix) :]
        try:
            self._path(key)
        except ValueError:
            return None
        return key
