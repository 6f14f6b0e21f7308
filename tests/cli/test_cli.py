"""CLI commands through Typer's runner against a live api (uvicorn on a loopback port)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

from miniml.api.app import create_app
from miniml.cli.main import app
from miniml.config import Settings
from tests.conftest import free_port

runner = CliRunner()


@pytest.fixture
def live_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    port = free_port()
    settings = Settings(data_dir=tmp_path / "d", api={"port": port})
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    key = (settings.data_dir / "admin.key").read_text().strip()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    from miniml.cli import context

    monkeypatch.setattr(context.console, "width", 250)
    monkeypatch.setattr(context.err_console, "width", 250)
    monkeypatch.delenv("MINIML_API_KEY", raising=False)
    monkeypatch.delenv("MINIML_URL", raising=False)
    yield url, key
    server.should_exit = True
    thread.join(10)


def test_login_stores_a_private_config_and_commands_use_it(live_api: tuple[str, str], tmp_path: Path) -> None:
    url, key = live_api
    result = runner.invoke(app, ["login", "--url", url, "--api-key", key])
    assert result.exit_code == 0, result.output
    cfg = tmp_path / "cfg" / "miniml" / "config.json"
    assert cfg.stat().st_mode & 0o777 == 0o600
    assert json.loads(cfg.read_text()) == {"url": url, "api_key": key}
    result = runner.invoke(app, ["projects", "create", "demo", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["name"] == "demo"
    listed = runner.invoke(app, ["projects", "list", "--json"])
    assert [p["name"] for p in json.loads(listed.output)] == ["demo"]
    assert "demo" in runner.invoke(app, ["projects", "get", "demo"]).output


def test_login_with_a_bad_key_fails_and_stores_nothing(live_api: tuple[str, str], tmp_path: Path) -> None:
    url, _key = live_api
    result = runner.invoke(app, ["login", "--url", url, "--api-key", "mml_bad_key"])
    assert result.exit_code == 1 and "401" in result.output
    assert not (tmp_path / "cfg" / "miniml" / "config.json").exists()


def test_keys_commands(live_api: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    url, key = live_api
    monkeypatch.setenv("MINIML_URL", url)
    monkeypatch.setenv("MINIML_API_KEY", key)
    assert runner.invoke(app, ["projects", "create", "demo"]).exit_code == 0
    created = runner.invoke(app, ["keys", "create", "--role", "engineer", "--project", "demo", "--json"])
    assert created.exit_code == 0, created.output
    new = json.loads(created.output)
    assert new["role"] == "engineer" and new["projects"] == ["demo"]
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).output)
    assert new["id"] in [k["id"] for k in listed] and all("key" not in k for k in listed)
    revoked = json.loads(runner.invoke(app, ["keys", "revoke", new["id"], "--json"]).output)
    assert revoked["revoked_at"]
    monkeypatch.setenv("MINIML_API_KEY", new["key"])
    denied = runner.invoke(app, ["projects", "list"])
    assert denied.exit_code == 1 and "revoked" in denied.output
    bad = runner.invoke(app, ["keys", "create", "--role", "viewer", "--project", "ghost"])
    monkeypatch.setenv("MINIML_API_KEY", key)
    bad = runner.invoke(app, ["keys", "create", "--role", "viewer", "--project", "ghost"])
    assert bad.exit_code == 1 and "ghost" in bad.output
    assert os.environ["MINIML_URL"] == url


def test_datasets_commands(live_api: tuple[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url, key = live_api
    monkeypatch.setenv("MINIML_URL", url)
    monkeypatch.setenv("MINIML_API_KEY", key)
    iris = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"
    runner.invoke(app, ["projects", "create", "demo"])
    up = runner.invoke(app, ["datasets", "upload", "demo", str(iris)])
    assert up.exit_code == 0, up.output
    assert "iris" in up.output and "150" in up.output
    listed = json.loads(runner.invoke(app, ["datasets", "list", "demo", "--json"]).output)
    assert listed[0]["name"] == "iris" and listed[0]["latest_version"] == 1
    shown = runner.invoke(app, ["datasets", "show", "demo", "iris", "1"])
    assert "petal_length" in shown.output and "categorical" in shown.output
    preview = json.loads(
        runner.invoke(app, ["datasets", "preview", "demo", "iris", "1", "--rows", "2", "--json"]).output
    )
    assert len(preview) == 2
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"petal_width": {"max": 1.0}}))
    failed = runner.invoke(app, ["datasets", "validate", "demo", "iris", "1", "--rules", str(rules)])
    assert failed.exit_code == 1 and "FAILED" in failed.output
    dest = tmp_path / "copy.csv"
    assert runner.invoke(app, ["datasets", "download", "demo", "iris", "1", str(dest)]).exit_code == 0
    assert dest.read_bytes() == iris.read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"a,b\n1,2,3\n")
    refused = runner.invoke(app, ["datasets", "upload", "demo", str(bad)])
    assert refused.exit_code == 1 and "Row 2" in refused.output
    assert runner.invoke(app, ["datasets", "delete", "demo", "iris", "1", "--yes"]).exit_code == 0
    # A job's resources (a Kubernetes work pool's requests and limits), and a bad one named.
    assert runner.invoke(app, ["datasets", "upload", "demo", str(iris)]).exit_code == 0
    job_args = ["jobs", "create", "demo", "--dataset", "iris", "--target", "target", "--json"]
    made = runner.invoke(app, [*job_args, "--cpu", "2", "--memory", "4Gi", "--gpu", "1"])
    assert made.exit_code == 0, made.output
    assert json.loads(made.output)["spec"]["resources"] == {"cpu": 2.0, "memory": "4Gi", "gpu": 1}
    bad_memory = runner.invoke(app, [*job_args, "--memory", "4GB"])
    assert bad_memory.exit_code == 1 and "resources.memory" in bad_memory.output, bad_memory.output
    runner.invoke(app, ["jobs", "cancel", "demo", str(json.loads(made.output)["id"])])
    seeded = runner.invoke(app, [*job_args, "--seed", "9", "--reproducible"])
    assert seeded.exit_code == 0, seeded.output
    spec = json.loads(seeded.output)["spec"]
    assert spec["seed"] == 9 and spec["reproducible"] is True
    runner.invoke(app, ["jobs", "cancel", "demo", str(json.loads(seeded.output)["id"])])
