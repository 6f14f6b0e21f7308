"""Datasets: named, versioned, immutable files with a schema and a profile."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from miniml.data.formats import FileFormat, TableFile
from miniml.data.profiles import json_value, schema_of
from miniml.data.validation import validate_table
from miniml.db import tables
from miniml.domain.names import check_name
from miniml.domain.tenancy import Caller
from miniml.errors import Conflict, InvalidInput, NotFound
from miniml.schemas.datasets import (
    ColumnSchema,
    DatasetRead,
    DatasetVersionRead,
    PreviewRead,
    ValidationReport,
    ValidationRequest,
)
from miniml.services.projects import read_project
from miniml.storage import ObjectStore


def object_key(project_id: int, fmt: FileFormat) -> str:
    """Built from ids only: nothing a user typed reaches the store's key space."""
    return f"projects/{project_id}/datasets/{uuid.uuid4().hex}.{fmt.value}"


def name_from_upload(given: str | None, filename: str) -> str:
    if given:
        return check_name(given, what="Dataset")
    if not filename:
        raise InvalidInput("Give the dataset a name (form field 'name'), or upload a file with a file name.")
    stem = filename.rsplit(".", 1)[0] if "." in filename.lstrip(".") else filename
    return check_name(stem, what="Dataset")


def read_dataset(session: Session, caller: Caller, project: str, name: str) -> tables.Dataset:
    proj = read_project(session, caller, project)
    dataset = session.scalar(
        select(tables.Dataset).where(tables.Dataset.project_id == proj.id, tables.Dataset.name == name)
    )
    if dataset is None:
        raise NotFound(f"Dataset {name!r} does not exist in project {project!r}.")
    return dataset


def list_datasets(session: Session, caller: Caller, project: str) -> list[DatasetRead]:
    proj = read_project(session, caller, project)
    stats = (
        select(
            tables.DatasetVersion.dataset_id,
            func.max(tables.DatasetVersion.version).label("latest"),
            func.count().label("n"),
        )
        .group_by(tables.DatasetVersion.dataset_id)
        .subquery()
    )
    rows = session.execute(
        select(tables.Dataset, stats.c.latest, stats.c.n)
        .outerjoin(stats, stats.c.dataset_id == tables.Dataset.id)
        .where(tables.Dataset.project_id == proj.id)
        .order_by(tables.Dataset.name)
    )
    return [
        DatasetRead(
            project=project,
            name=d.name,
            created_at=d.created_at,
            created_by=d.created_by,
            latest_version=latest,
            version_count=n or 0,
        )
        for d, latest, n in rows
    ]


def read_dataset_summary(session: Session, caller: Caller, project: str, name: str) -> DatasetRead:
    for item in list_datasets(session, caller, project):
        if item.name == name:
            return item
    raise NotFound(f"Dataset {name!r} does not exist in project {project!r}.")


def list_versions(session: Session, caller: Caller, project: str, name: str) -> list[tables.DatasetVersion]:
    dataset = read_dataset(session, caller, project, name)
    query = select(tables.DatasetVersion).where(tables.DatasetVersion.dataset_id == dataset.id)
    return list(session.scalars(query.order_by(tables.DatasetVersion.version)))


def read_version(session: Session, caller: Caller, project: str, name: str, version: int) -> tables.DatasetVersion:
    dataset = read_dataset(session, caller, project, name)
    row = session.scalar(
        select(tables.DatasetVersion).where(
            tables.DatasetVersion.dataset_id == dataset.id, tables.DatasetVersion.version == version
        )
    )
    if row is None:
        raise NotFound(f"Dataset {name!r} has no version {version} in project {project!r}.")
    return row


def read_version_by_uri(
    session: Session, store: ObjectStore, caller: Caller, project: str, uri: str
) -> tables.DatasetVersion:
    """Resolve a URI against this project's own records; nothing outside them is ever fetched."""
    proj = read_project(session, caller, project)
    key = store.key_for_uri(uri)
    row = None
    if key is not None:
        row = session.scalar(
            select(tables.DatasetVersion)
            .join(tables.Dataset)
            .where(tables.DatasetVersion.object_key == key, tables.Dataset.project_id == proj.id)
        )
    if row is None:
        raise InvalidInput(
            f"{uri[:200]!r} is not a dataset version of project {project!r}; use the uri (or s3_uri) an upload "
            "to this project returned."
        )
    return row


def _same_bytes(session: Session, project_id: int, name: str, sha256: str) -> tables.DatasetVersion | None:
    return session.scalar(
        select(tables.DatasetVersion)
        .join(tables.Dataset)
        .where(
            tables.Dataset.project_id == project_id,
            tables.Dataset.name == name,
            tables.DatasetVersion.sha256 == sha256,
        )
    )


def find_same(
    session: Session, caller: Caller, project: str, name: str, sha256: str
) -> tuple[int, tables.DatasetVersion | None]:
    """The project's id, and the version of ``name`` that already holds these bytes (if any)."""
    proj = read_project(session, caller, project)
    return proj.id, _same_bytes(session, proj.id, name, sha256)


_CREATE_ATTEMPTS = 50


def create_version(
    session: Session,
    caller: Caller,
    project: str,
    name: str,
    *,
    key: str,
    sha256: str,
    size: int,
    filename: str,
    table: TableFile,
    profile: dict[str, Any],
) -> tuple[tables.DatasetVersion, bool]:
    """Record a new version whose bytes are already stored under ``key``.

    Returns the version holding the same bytes instead (created=False) when one appeared since
    ``find_same`` (two identical uploads at once): the caller then deletes its object.
    """
    proj = read_project(session, caller, project)
    # Parallel uploads to one name race for the dataset row and the next version number: each
    # attempt runs in a savepoint behind the project's row lock, and a lost race (a unique
    # violation) is read again and retried.
    for _attempt in range(_CREATE_ATTEMPTS):
        try:
            with session.begin_nested():
                # Take the project's row for writing first: uploads to one project queue here
                # (PostgreSQL row lock; SQLite's write lock, taken before any read so that the
                # busy timeout applies instead of a stale-snapshot "database is locked").
                session.execute(update(tables.Project).where(tables.Project.id == proj.id).values(id=tables.Project.id))
                same = _same_bytes(session, proj.id, name, sha256)
                if same is not None:
                    return same, False
                dataset = session.scalar(
                    select(tables.Dataset).where(tables.Dataset.project_id == proj.id, tables.Dataset.name == name)
                )
                if dataset is None:
                    dataset = tables.Dataset(project_id=proj.id, name=name, created_by=caller.key_id)
                    session.add(dataset)
                    session.flush()
                latest = session.scalar(
                    select(func.max(tables.DatasetVersion.version)).where(
                        tables.DatasetVersion.dataset_id == dataset.id
                    )
                )
                row = tables.DatasetVersion(
                    dataset_id=dataset.id,
                    version=(latest or 0) + 1,
                    sha256=sha256,
                    size_bytes=size,
                    format=table.format.value,
                    delimiter=table.delimiter,
                    filename=filename[:255],
                    object_key=key,
                    row_count=profile["rows"],
                    column_types={k: str(v) for k, v in table.column_types.items()},
                    profile=profile,
                    created_by=caller.key_id,
                )
                session.add(row)
                session.flush()
            return row, True
        except IntegrityError:
            session.expire_all()
    raise Conflict(f"Dataset {name!r} is being written by many uploads at once; send this one again.")


def references(session: Session, version: tables.DatasetVersion) -> list[str]:
    """What still uses a version (jobs, model versions); deleting it is refused while any does."""
    # Add new referencing resources here.
    jobs = session.scalars(select(tables.Job.id).where(tables.Job.dataset_version_id == version.id)).all()
    return [f"job {j}" for j in jobs]


def delete_version(session: Session, caller: Caller, project: str, name: str, version: int) -> str:
    """Delete the row; return the object key for the caller to delete once the transaction commits."""
    row = read_version(session, caller, project, name, version)
    users = references(session, row)
    if users:
        raise Conflict(f"Dataset {name!r} version {version} is still used by {', '.join(users)}; delete those first.")
    key = row.object_key
    session.delete(row)
    session.flush()
    return key


def table_file(row: tables.DatasetVersion, path: Path) -> TableFile:
    types = {k: pa.type_for_alias(v) for k, v in row.column_types.items()}
    return TableFile(path=path, format=FileFormat(row.format), delimiter=row.delimiter, column_types=types)


def to_read(row: tables.DatasetVersion, store: ObjectStore) -> DatasetVersionRead:
    uri = store.uri(row.object_key)
    return DatasetVersionRead(
        project=row.dataset.project.name,
        dataset=row.dataset.name,
        version=row.version,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        format=row.format,
        delimiter=row.delimiter,
        filename=row.filename,
        rows=row.row_count,
        columns=[ColumnSchema.model_validate(c) for c in schema_of(row.profile)],
        profile=row.profile,
        uri=uri,
        s3_uri=uri,
        created_at=row.created_at,
        created_by=row.created_by,
    )


def preview(table: TableFile, rows: int) -> PreviewRead:
    out: list[dict[str, Any]] = []
    names: list[str] = []
    for batch in table.batches(batch_bytes=256 * 1024):
        names = batch.schema.names
        out.extend(batch.slice(0, rows - len(out)).to_pylist())
        if len(out) >= rows:
            break
    return PreviewRead(columns=names, rows=[{k: json_value(v) for k, v in r.items()} for r in out])


def validate_version(row: tables.DatasetVersion, store: ObjectStore, body: ValidationRequest) -> ValidationReport:
    kinds = {c["name"]: c["kind"] for c in row.profile["columns"]}
    rules = {col: rule.model_dump(exclude_none=True) for col, rule in body.rules.items()}
    with store.open_local(row.object_key) as path:
        count, issues = validate_table(table_file(row, path), kinds, rules)
    return ValidationReport.model_validate({"ok": not issues, "rows": count, "columns": len(kinds), "issues": issues})
