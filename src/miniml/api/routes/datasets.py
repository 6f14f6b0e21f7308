from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse

from miniml.api.deps import AdminDep, DbDep, EngineerDep, SettingsDep, StoreDep, VersionPath, ViewerDep
from miniml.api.uploads import Upload, receive_upload
from miniml.config import Settings
from miniml.data.formats import SNIFF_BYTES, FileFormat, TableFile, detect
from miniml.data.profiles import profile_table
from miniml.data.spool import Spool, SpoolFailed
from miniml.domain.tenancy import Caller
from miniml.schemas.datasets import (
    DatasetRead,
    DatasetVersionRead,
    PreviewRead,
    ValidationReport,
    ValidationRequest,
)
from miniml.services import datasets, projects
from miniml.storage import ObjectStore

router = APIRouter(prefix="/api/v1/projects/{project}/datasets", tags=["datasets"])

PREVIEW_MAX_ROWS = 1000
# How far below request handling the work behind an upload runs, in Linux nice steps.
BACKGROUND_NICE = 10


def _project_id(db: DbDep, caller: Caller, project: str) -> int:
    with db.begin() as session:
        return projects.read_project(session, caller, project).id


Staged = tuple[TableFile, str, dict[str, Any]]


def _lower_priority() -> None:
    """Let this thread, and the threads it starts (they inherit it), yield the CPU to the event
    loop: bytes keep arriving and other requests are answered at full speed while a large upload
    is parsed and profiled; the profile takes whatever CPU is left. Linux only (a thread's nice)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def _stage(store: ObjectStore, project_id: int, spool: Spool, size_hint: int) -> Staged:
    """Check, profile and store the file while it arrives; nothing stays stored on failure.

    A CSV is profiled as its bytes land (a Parquet file, whose index is at its end, once it is
    complete); S3 gets each part as soon as it is on disk; a local store gets the finished temp
    file renamed into place. The upload's own time and the profile's overlap instead of adding up.
    The profile runs at background priority; the S3 parts go at normal priority, so the transfer
    keeps pace with the arrival and the profile fills the CPU left over.
    """
    spool.wait_for(SNIFF_BYTES)
    with spool.path.open("rb") as fh:
        if fh.read(4) == b"PAR1":
            spool.wait_done()
    table = detect(spool.path, filename=spool.filename)
    if table.format is FileFormat.csv:
        table.opener = spool.reader
    key = datasets.object_key(project_id, table.format)
    if not store.remote:
        _lower_priority()
        profile = profile_table(table)
        spool.wait_done()
        table.opener = None
        store.put_file(key, spool.path, move=True)
        return table, key, profile
    stop = threading.Event()

    def wait_for(size: int) -> int:
        if stop.is_set():
            raise SpoolFailed("the file was refused")
        return spool.wait_for(size)

    with ThreadPoolExecutor(1, thread_name_prefix="miniml-put") as pool:
        stored = pool.submit(store.put_growing, key, spool.path, wait_for, size_hint=size_hint)
        try:
            _lower_priority()  # after the put's thread started: it keeps this thread's priority
            profile = profile_table(table)
            spool.wait_done()
            stored.result()
        except BaseException:
            stop.set()
            with contextlib.suppress(Exception):
                stored.result()
            with contextlib.suppress(Exception):
                store.delete(key)
            raise
    table.opener = None
    return table, key, profile


def _register(
    db: DbDep, store: ObjectStore, caller: Caller, project: str, name: str | None, upload: Upload, staged: Staged
) -> tuple[DatasetVersionRead, bool]:
    """The metadata row for a stored file: a new version, or the version that holds these bytes."""
    table, key, profile = staged
    try:
        dataset_name = datasets.name_from_upload(name or upload.fields.get("name"), upload.filename)
        with db.begin() as session:
            _id, same = datasets.find_same(session, caller, project, dataset_name, upload.sha256)
            if same is not None:  # the same bytes again: that version, and our copy goes
                store.delete(key)
                return datasets.to_read(same, store), False
        with db.begin() as session:
            row, created = datasets.create_version(
                session,
                caller,
                project,
                dataset_name,
                key=key,
                sha256=upload.sha256,
                size=upload.size,
                filename=upload.filename,
                table=table,
                profile=profile,
            )
            read = datasets.to_read(row, store)
    except BaseException:
        store.delete(key)
        raise
    if not created:
        store.delete(key)  # an identical upload finished first: keep its object, not ours
    return read, created


def _in_thread(fn: Callable[..., Staged], *args: Any) -> Future[Staged]:
    """Run ``fn`` on its own thread (it waits on the upload, so not from a pool it could starve)."""
    future: Future[Staged] = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="miniml-ingest", daemon=True).start()
    return future


async def upload_dataset_version(
    request: Request,
    response: Response,
    db: DbDep,
    store: ObjectStore,
    settings: Settings,
    caller: Caller,
    project: str,
    name: str | None,
) -> DatasetVersionRead:
    # Refuse an unknown (or someone else's) project before a single byte is stored.
    project_id = await anyio.to_thread.run_sync(_project_id, db, caller, project)
    limit = settings.api.max_upload_bytes
    length = request.headers.get("content-length", "")
    size_hint = min(int(length), limit) if length.isdigit() else limit
    spool = Spool()
    staging = _in_thread(_stage, store, project_id, spool, size_hint)
    try:
        upload = await receive_upload(request, tmp_dir=settings.data_dir / "tmp", max_bytes=limit, spool=spool)
    except BaseException:
        spool.fail()
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await asyncio.wrap_future(staging)  # it removes what it stored before we answer
        raise
    try:
        with anyio.CancelScope(shield=True):
            staged = await asyncio.wrap_future(staging)
        read, created = await anyio.to_thread.run_sync(_register, db, store, caller, project, name, upload, staged)
    finally:
        upload.discard()
    response.status_code = 201 if created else 200
    return read


@router.post("", status_code=201, responses={200: {"description": "The same bytes exist: that version."}})
async def create_dataset_version(
    project: str,
    request: Request,
    response: Response,
    db: DbDep,
    store: StoreDep,
    settings: SettingsDep,
    caller: EngineerDep,
    name: str | None = None,
) -> DatasetVersionRead:
    """Upload a CSV or Parquet file (multipart field `file`, optional `name`) as a new version."""
    return await upload_dataset_version(request, response, db, store, settings, caller, project, name)


@router.get("")
def list_datasets(project: str, db: DbDep, caller: ViewerDep) -> list[DatasetRead]:
    """List datasets with their latest version."""
    with db.begin() as session:
        return datasets.list_datasets(session, caller, project)


@router.get("/{name}")
def read_dataset(project: str, name: str, db: DbDep, caller: ViewerDep) -> DatasetRead:
    """Get one dataset."""
    with db.begin() as session:
        return datasets.read_dataset_summary(session, caller, project, name)


@router.get("/{name}/versions")
def list_dataset_versions(
    project: str, name: str, db: DbDep, store: StoreDep, caller: ViewerDep
) -> list[DatasetVersionRead]:
    """List a dataset's versions, oldest first."""
    with db.begin() as session:
        return [datasets.to_read(v, store) for v in datasets.list_versions(session, caller, project, name)]


@router.get("/{name}/versions/{version}")
def read_dataset_version(
    project: str, name: str, version: VersionPath, db: DbDep, store: StoreDep, caller: ViewerDep
) -> DatasetVersionRead:
    """Get one version: metadata, schema and profile."""
    with db.begin() as session:
        return datasets.to_read(datasets.read_version(session, caller, project, name, version), store)


@router.get("/{name}/versions/{version}/file")
def download_dataset_version(
    project: str, name: str, version: VersionPath, db: DbDep, store: StoreDep, caller: ViewerDep
) -> StreamingResponse:
    """Download the file, byte-identical to the upload (streamed)."""
    with db.begin() as session:
        row = datasets.read_version(session, caller, project, name, version)
        key, size, fmt = row.object_key, row.size_bytes, row.format
    chunks = store.iter_bytes(key)
    # Read the first chunk now: a missing object is a clean 404, not a response cut off mid-body.
    first = next(chunks, b"")
    return StreamingResponse(
        itertools.chain([first], chunks),
        media_type="text/csv" if fmt == "csv" else "application/vnd.apache.parquet",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{name}-v{version}.{fmt}"',
        },
    )


@router.get("/{name}/versions/{version}/preview")
def preview_dataset_version(
    project: str,
    name: str,
    version: VersionPath,
    db: DbDep,
    store: StoreDep,
    caller: ViewerDep,
    rows: Annotated[int, Query(ge=1, le=PREVIEW_MAX_ROWS)] = 20,
) -> PreviewRead:
    """The first rows as JSON."""
    with db.begin() as session:
        row = datasets.read_version(session, caller, project, name, version)
    with store.open_local(row.object_key) as path:
        return datasets.preview(datasets.table_file(row, path), rows)


@router.post("/{name}/versions/{version}/validate")
def validate_dataset_version(
    project: str,
    name: str,
    version: VersionPath,
    body: ValidationRequest,
    db: DbDep,
    store: StoreDep,
    caller: ViewerDep,
) -> ValidationReport:
    """Check rules (min, max, allow_nulls, allowed_values, unique, dtype) against a version."""
    with db.begin() as session:
        row = datasets.read_version(session, caller, project, name, version)
    return datasets.validate_version(row, store, body)


@router.delete("/{name}/versions/{version}", status_code=204)
def delete_dataset_version(
    project: str, name: str, version: VersionPath, db: DbDep, store: StoreDep, caller: AdminDep
) -> Response:
    """Delete a version (refused with 409 while a job or model version uses it)."""
    with db.begin() as session:
        key = datasets.delete_version(session, caller, project, name, version)
    store.delete(key)  # after the commit: a failed delete leaves an orphan object, never a dangling row
    return Response(status_code=204)
