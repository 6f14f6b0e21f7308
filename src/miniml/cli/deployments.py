from __future__ import annotations

import json
from pathlib import Path

import typer

from miniml.cli.context import client, fail, resolve_login, show
from miniml.errors import MiniMLError

app = typer.Typer(help="Deployments: named endpoints serving a model version, alias or split.", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")
COLUMNS = ["name", "model_name", "target", "desired", "ready", "error", "endpoint"]


@app.command("create")
def create(
    project: str,
    name: str,
    model: str,
    target: str = typer.Option("staging", help="Alias or version."),
    as_json: bool = JSON,
) -> None:
    """Deploy a model under an endpoint name."""
    try:
        show(client().deployments.create(project, name, model, target=target), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("list")
def list_(project: str, as_json: bool = JSON) -> None:
    """List deployments."""
    try:
        show(client().deployments.list(project), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("get")
def get(project: str, name: str, as_json: bool = JSON) -> None:
    """Show a deployment and what each replica serves."""
    try:
        show(client().deployments.get(project, name), as_json=as_json, columns=[*COLUMNS, "replicas"])
    except MiniMLError as exc:
        fail(exc)


@app.command("update")
def update(
    project: str, name: str, target: str = typer.Option(..., help="Alias or version."), as_json: bool = JSON
) -> None:
    """Point a deployment at a new target."""
    try:
        show(client().deployments.update(project, name, target=target), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("rollback")
def rollback(project: str, name: str, as_json: bool = JSON) -> None:
    """Go back to the previous target."""
    try:
        show(client().deployments.rollback(project, name), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("delete")
def delete(project: str, name: str, yes: bool = typer.Option(False, "--yes")) -> None:
    """Stop serving and delete a deployment."""
    if not yes:
        typer.confirm(f"Delete deployment {name!r}?", abort=True)
    try:
        client().deployments.delete(project, name)
    except MiniMLError as exc:
        fail(exc)
        return
    typer.echo(f"deleted {name}")


def predict_command(
    endpoint: str,
    rows: str = typer.Option(..., help='JSON list of rows, or @file.json: [{"col": 1.0, ...}]'),
    probabilities: bool = typer.Option(False, "--probabilities"),
    inference_url: str = typer.Option("http://127.0.0.1:8080", envvar="MINIML_INFERENCE_URL"),
) -> None:
    """Predict with an endpoint of the inference service."""
    data = json.loads(Path(rows[1:]).read_text() if rows.startswith("@") else rows)
    url, key = resolve_login()
    from miniml.sdk.client import Client

    try:
        result = Client(url, api_key=key, inference_url=inference_url).predict(
            endpoint, data, probabilities=probabilities
        )
    except MiniMLError as exc:
        fail(exc)
        return
    typer.echo(json.dumps(result))
