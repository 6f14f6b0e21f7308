from __future__ import annotations

import typer

from miniml.cli.context import client, fail, show
from miniml.errors import MiniMLError

app = typer.Typer(help="Models: the project's view of the MLflow registry.", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")
VERSION_COLUMNS = ["version", "aliases", "stage", "family", "job_id", "dataset", "dataset_version", "created_at"]


@app.command("list")
def list_(project: str, as_json: bool = JSON) -> None:
    """List registered models."""
    try:
        show(
            client().models.list(project),
            as_json=as_json,
            columns=["name", "registered_name", "aliases", "latest_version"],
        )
    except MiniMLError as exc:
        fail(exc)


@app.command("versions")
def versions(project: str, model: str, as_json: bool = JSON) -> None:
    """List a model's versions with lineage."""
    try:
        show(client().models.versions(project, model), as_json=as_json, columns=VERSION_COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("compare")
def compare(project: str, model: str, a: str, b: str, as_json: bool = JSON) -> None:
    """Compare two versions' metrics."""
    try:
        result = client().models.compare(project, model, a, b)
    except MiniMLError as exc:
        fail(exc)
        return
    if as_json:
        show(result, as_json=True)
        return
    rows = [
        {"metric": k, f"v{a}": result.a.metrics.get(k), f"v{b}": result.b.metrics.get(k), "b - a": d}
        for k, d in result.metric_differences.items()
    ]
    show(rows, as_json=False, columns=["metric", f"v{a}", f"v{b}", "b - a"])


@app.command("approval")
def approval(
    project: str,
    model: str,
    version: str,
    action: str = typer.Argument(..., help="request (engineer), approve or reject (admin)"),
    note: str = typer.Option(..., "--note", help="Why: kept on the version and in the audit log"),
    as_json: bool = JSON,
) -> None:
    """Ask for production approval of a version, or (admin) approve or reject it."""
    try:
        read = client().models.approval(project, model, version, action, note)
    except MiniMLError as exc:
        fail(exc)
    if as_json:
        show(read, as_json=True, columns=VERSION_COLUMNS)
        return
    approval_ = read.approval
    status = approval_.status if approval_ else "none"
    print(f"{model} v{read.version}: {status}; aliases {', '.join(read.aliases) or 'none'}")


@app.command("promote")
def promote(
    project: str,
    model: str,
    version: str,
    stage: str = typer.Option(..., "--stage", help="staging or production"),
    as_json: bool = JSON,
) -> None:
    """Move the staging or production alias to a version."""
    try:
        show(client().models.promote(project, model, version, stage), as_json=as_json, columns=VERSION_COLUMNS)
    except MiniMLError as exc:
        fail(exc)
