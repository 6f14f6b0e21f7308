from __future__ import annotations

import typer

from miniml.cli.context import client, fail, show
from miniml.domain.roles import Role
from miniml.errors import MiniMLError

app = typer.Typer(help="API keys and roles (admin only).", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON for scripts.")
COLUMNS = ["id", "name", "role", "projects", "expires_at", "revoked_at", "last_used_at"]


@app.command("create")
def create(
    role: Role = typer.Option(..., "--role", help="admin, engineer or viewer."),
    project: list[str] = typer.Option([], "--project", help="Project the key may touch (repeatable)."),
    name: str = typer.Option("", "--name", help="A label for the key."),
    expires_in_days: float | None = typer.Option(None, "--expires-in-days"),
    as_json: bool = JSON,
) -> None:
    """Create a key; its secret is printed once."""
    try:
        created = client().keys.create(role, projects=project, name=name, expires_in_days=expires_in_days)
    except MiniMLError as exc:
        fail(exc)
        return
    if as_json:
        show(created, as_json=True)
        return
    show(created, as_json=False, columns=COLUMNS)
    typer.echo(f"key (shown once, store it now): {created.key}")


@app.command("list")
def list_(as_json: bool = JSON) -> None:
    """List keys (never their secrets)."""
    try:
        show(client().keys.list(), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)


@app.command("revoke")
def revoke(key_id: str, as_json: bool = JSON) -> None:
    """Revoke a key; its tokens stop working too."""
    try:
        show(client().keys.revoke(key_id), as_json=as_json, columns=COLUMNS)
    except MiniMLError as exc:
        fail(exc)
