from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from miniml.cli.context import client, console, fail, show
from miniml.errors import MiniMLError

app = typer.Typer(help="Datasets: versioned CSV/Parquet files with a schema and a profile.", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")
VERSION_COLUMNS = ["dataset", "version", "rows", "format", "size_bytes", "sha256", "uri"]


@app.command("upload")
def upload(
    project: str,
    path: Path,
    name: str | None = typer.Option(None, help="Dataset name; default the file's stem."),
    as_json: bool = JSON,
) -> None:
    """Upload a file as a new version, with a progress bar."""
    try:
        if as_json:
            show(client().datasets.upload(project, path, name=name), as_json=True)
            return
        columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress("[progress.description]{task.description}", *columns, console=console) as bar:
            task = bar.add_task(f"uploading {path.name}", total=path.stat().st_size)
            version = client().datasets.upload(
                project, path, name=name, progress=lambda sent, total: bar.update(task, completed=sent)
            )
    except MiniMLError as exc:
        fail(exc)
        return
    show(version, as_json=False, columns=VERSION_COLUMNS)


@app.command("list")
def list_(project: str, as_json: bool = JSON) -> None:
    """List a project's datasets."""
    try:
        items = client().datasets.list(project)
    except MiniMLError as exc:
        fail(exc)
        return
    show(items, as_json=as_json, columns=["name", "latest_version", "version_count", "created_at"])


@app.command("versions")
def versions(project: str, name: str, as_json: bool = JSON) -> None:
    """List a dataset's versions."""
    try:
        show(client().datasets.versions(project, name), as_json=as_json, columns=VERSION_COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("show")
def show_version(project: str, name: str, version: int, as_json: bool = JSON) -> None:
    """Show a version's schema and profile."""
    try:
        item = client().datasets.version(project, name, version)
    except MiniMLError as exc:
        fail(exc)
        return
    if as_json:
        show(item, as_json=True)
        return
    console.print(f"{item.dataset} v{item.version}: {item.rows} rows, {item.format}, {item.uri}")
    table = Table("column", "kind", "nulls", "distinct", "min", "max", "mean", "top")
    for col in item.profile["columns"]:
        top = ", ".join(f"{t['value']} ({t['count']})" for t in col.get("top", [])[:3])
        cells = [col.get(k) for k in ("min", "max", "mean")]
        table.add_row(
            col["name"],
            col["kind"],
            str(col["null_count"]),
            str(col["distinct_count"]),
            *("" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells),
            top,
        )
    console.print(table)


@app.command("preview")
def preview(project: str, name: str, version: int, rows: int = 10, as_json: bool = JSON) -> None:
    """Show the first rows."""
    try:
        data = client().datasets.preview(project, name, version, rows=rows)
    except MiniMLError as exc:
        fail(exc)
        return
    show(data.rows, as_json=as_json, columns=data.columns)


@app.command("validate")
def validate(
    project: str,
    name: str,
    version: int,
    rules: Path = typer.Option(..., help='JSON file: {"column": {"min": 0, "allow_nulls": false}, ...}'),
    as_json: bool = JSON,
) -> None:
    """Check rules against a version; exits 1 when any rule fails."""
    try:
        report = client().datasets.validate(project, name, version, json.loads(rules.read_text()))
    except MiniMLError as exc:
        fail(exc)
        return
    if as_json:
        show(report, as_json=True)
    else:
        console.print(f"{'OK' if report.ok else 'FAILED'}: {report.rows} rows, {report.columns} columns")
        show(report.issues, as_json=False, columns=["column", "rule", "count", "example_rows", "detail"])
    if not report.ok:
        raise typer.Exit(1)


@app.command("download")
def download(project: str, name: str, version: int, dest: Path) -> None:
    """Download a version's file."""
    try:
        written = client().datasets.download(project, name, version, dest)
    except MiniMLError as exc:
        fail(exc)
        return
    typer.echo(f"wrote {written} ({written.stat().st_size} bytes)")


@app.command("delete")
def delete(project: str, name: str, version: int, yes: bool = typer.Option(False, "--yes")) -> None:
    """Delete a version (admin)."""
    if not yes:
        typer.confirm(f"Delete {name} v{version}?", abort=True)
    try:
        client().datasets.delete_version(project, name, version)
    except MiniMLError as exc:
        fail(exc)
        return
    typer.echo(f"deleted {name} v{version}")
