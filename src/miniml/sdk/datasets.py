from __future__ import annotations

import builtins
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from miniml.schemas.datasets import (
    DatasetRead,
    DatasetVersionRead,
    PreviewRead,
    ValidationReport,
    ValidationRequest,
)
from miniml.sdk.bodies import request_body

if TYPE_CHECKING:
    from miniml.sdk.client import Client

Progress = Callable[[int, int], None]


class _ProgressReader:
    """Wraps a file so each chunk httpx reads reports (bytes sent, total)."""

    def __init__(self, fh: IO[bytes], total: int, progress: Progress) -> None:
        self.fh, self.total, self.progress, self.sent = fh, total, progress, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.fh.read(size)
        self.sent += len(chunk)
        self.progress(self.sent, self.total)
        return chunk


class Datasets:
    def __init__(self, client: Client) -> None:
        self._c = client

    def _url(self, project: str, *parts: str | int) -> str:
        return "/".join([f"/api/v1/projects/{project}/datasets", *map(str, parts)])

    def upload(
        self, project: str, path: str | Path, *, name: str | None = None, progress: Progress | None = None
    ) -> DatasetVersionRead:
        """Upload a CSV or Parquet file as a new version (or get the version holding the same bytes).

        Raises:
            InvalidInput: malformed file or bad name.
            PayloadTooLarge: over the server's upload limit.
            NotFound: no such project (or not yours).
        """
        path = Path(path)
        total = path.stat().st_size
        with path.open("rb") as fh:
            body: Any = _ProgressReader(fh, total, progress) if progress else fh
            data = {"name": name} if name else None
            response = self._c.request(
                "POST", self._url(project), files={"file": (path.name, body)}, data=data, timeout=None
            )
        return DatasetVersionRead.model_validate(response.json())

    def list(self, project: str) -> list[DatasetRead]:
        """List a project's datasets."""
        return [DatasetRead.model_validate(d) for d in self._c.request("GET", self._url(project)).json()]

    def get(self, project: str, name: str) -> DatasetRead:
        """Get one dataset (its latest version number and count)."""
        return DatasetRead.model_validate(self._c.request("GET", self._url(project, name)).json())

    def versions(self, project: str, name: str) -> builtins.list[DatasetVersionRead]:
        """List a dataset's versions, oldest first."""
        rows = self._c.request("GET", self._url(project, name, "versions")).json()
        return [DatasetVersionRead.model_validate(v) for v in rows]

    def version(self, project: str, name: str, version: int) -> DatasetVersionRead:
        """Get one version with its schema and profile."""
        return DatasetVersionRead.model_validate(
            self._c.request("GET", self._url(project, name, "versions", version)).json()
        )

    def profile(self, project: str, name: str, version: int) -> dict[str, Any]:
        """The version's profile (rows, and per column: kind, nulls, min/max/mean/std, top, histogram)."""
        return self.version(project, name, version).profile

    def preview(self, project: str, name: str, version: int, *, rows: int = 20) -> PreviewRead:
        """The first rows as JSON."""
        url = self._url(project, name, "versions", version, "preview")
        return PreviewRead.model_validate(self._c.request("GET", url, params={"rows": rows}).json())

    def validate(self, project: str, name: str, version: int, rules: dict[str, dict[str, Any]]) -> ValidationReport:
        """Check rules per column; returns {ok, rows, columns, issues}.

        Raises:
            InvalidInput: a rule names an unknown column or does not fit the column's type.
        """
        body = request_body(ValidationRequest, {"rules": rules}).model_dump(exclude_none=True)
        url = self._url(project, name, "versions", version, "validate")
        return ValidationReport.model_validate(self._c.request("POST", url, json=body).json())

    def download(self, project: str, name: str, version: int, dest: str | Path) -> Path:
        """Stream the version's file to ``dest``; returns the path written."""
        dest = Path(dest)
        url = self._url(project, name, "versions", version, "file")
        with self._c.stream("GET", url) as response, dest.open("wb") as out:
            for chunk in response.iter_bytes():
                out.write(chunk)
        return dest

    def delete_version(self, project: str, name: str, version: int) -> None:
        """Delete a version (admin).

        Raises:
            Conflict: a job or model version still uses it.
        """
        self._c.request("DELETE", self._url(project, name, "versions", version))
