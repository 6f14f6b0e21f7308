"""Where the CLI finds its api URL and key: env vars, then `miniml login`'s file, then the local admin key."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from miniml.errors import MiniMLError
from miniml.sdk.client import Client

P = ParamSpec("P")
R = TypeVar("R")
console = Console()
err_console = Console(stderr=True)


def config_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "miniml" / "config.json"


def save_login(url: str, api_key: str) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": url, "api_key": api_key}, fh)
    os.chmod(path, 0o600)
    return path


def resolve_login() -> tuple[str, str | None]:
    saved: dict[str, str] = {}
    path = config_path()
    if path.exists():
        saved = json.loads(path.read_text())
    url = os.environ.get("MINIML_URL") or saved.get("url") or "http://127.0.0.1:8000"
    key = os.environ.get("MINIML_API_KEY") or saved.get("api_key")
    if not key:
        local = Path(os.environ.get("MINIML_DATA_DIR", ".miniml")) / "admin.key"
        if local.exists():
            key = local.read_text().strip()
    return url, key


def client() -> Client:
    url, key = resolve_login()
    return Client(url, api_key=key)


def fail(exc: MiniMLError) -> None:
    err_console.print(f"[red]error ({exc.status}):[/red] {exc.detail}")
    raise typer.Exit(1)


def api_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A command whose API errors print as one red line (status and detail) and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except MiniMLError as exc:
            fail(exc)
            raise  # unreachable: fail exits

    return wrapper


def show(items: BaseModel | list[Any], *, as_json: bool, columns: list[str] | None = None) -> None:
    rows = items if isinstance(items, list) else [items]
    data = [r.model_dump(mode="json") if isinstance(r, BaseModel) else r for r in rows]
    if as_json:
        typer.echo(json.dumps(data if isinstance(items, list) else data[0], indent=2))
        return
    cols = columns or (list(data[0]) if data else [])
    table = Table(*cols)
    for row in data:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in cols))
    console.print(table)
