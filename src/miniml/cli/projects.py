from __future__ import annotations

import typer

from miniml.cli.context import client, fail, show
from miniml.errors import MiniMLError

app = typer.Typer(help="Projects: workspaces and the unit of tenancy.", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")
COLUMNS = ["name", "description", "created_at", "created_by"]


@app.command("create")
def create(name: str, description: str = "", as_json: bool = JSON) -> None:
    """Create a project."""
    try:
        show(client().projects.create(name, description=description), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("list")
def list_(as_json: bool = JSON) -> None:
    """List the projects your key may see."""
    try:
        show(client().projects.list(), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("get")
def get(name: str, as_json: bool = JSON) -> None:
    """Show one project."""
    try:
        show(client().projects.get(name), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("delete")
def delete(name: str, yes: bool = typer.Option(False, "--yes", help="Do not ask.")) -> None:
    """Delete a project and everything in it: datasets, jobs, deployments, its models and runs in MLflow."""
    if not yes:
        typer.confirm(f"Delete project {name!r} and everything in it?", abort=True)
    try:
        client().projects.delete(name)
    except MiniMLError as exc:
        fail(exc)
    typer.echo(f"deleted project {name}")
