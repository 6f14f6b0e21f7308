"""Projects, bad names, tenancy, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from miniml.api.app import create_app
from miniml.config import Settings
from tests.conftest import assert_problem


@pytest.fixture
def db_client(db_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(data_dir=tmp_path / "d", db={"url": db_url})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c, {"X-API-Key": (settings.data_dir / "admin.key").read_text().strip()}


def test_project_lifecycle(db_client: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = db_client
    created = client.post("/api/v1/projects", json={"name": "demo", "description": "iris"}, headers=admin)
    assert created.status_code == 201 and created.json()["name"] == "demo"
    assert [p["name"] for p in client.get("/api/v1/projects", headers=admin).json()] == ["demo"]
    assert client.get("/api/v1/projects/demo", headers=admin).json()["description"] == "iris"
    assert client.delete("/api/v1/projects/demo", headers=admin).status_code == 204
    assert_problem(client.get("/api/v1/projects/demo", headers=admin), 404, "demo")


def test_seed_route_creates_a_project(client: TestClient, admin: dict[str, str]) -> None:
    assert client.post("/projects", json={"name": "demo"}, headers=admin).status_code == 201
    assert client.get("/api/v1/projects/demo", headers=admin).status_code == 200


@pytest.mark.parametrize("name", ["../x", "A B", "", "a" * 64, "démo", "Demo", "-demo", "demo-", "de/mo", "de\x00mo"])
def test_bad_project_names_are_422_and_create_nothing(db_client: tuple[TestClient, dict[str, str]], name: str) -> None:
    client, admin = db_client
    body = assert_problem(client.post("/api/v1/projects", json={"name": name}, headers=admin), 422, "not valid")
    assert "lowercase" in str(body["detail"])
    assert client.get("/api/v1/projects", headers=admin).json() == []


def test_longest_valid_name_is_accepted(client: TestClient, admin: dict[str, str]) -> None:
    assert client.post("/api/v1/projects", json={"name": "a" * 63}, headers=admin).status_code == 201


def test_duplicate_project_is_409_and_keeps_the_first(db_client: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = db_client
    client.post("/api/v1/projects", json={"name": "demo", "description": "first"}, headers=admin)
    assert_problem(
        client.post("/api/v1/projects", json={"name": "demo", "description": "second"}, headers=admin),
        409,
        "already exists",
    )
    assert client.get("/api/v1/projects/demo", headers=admin).json()["description"] == "first"


def test_unknown_fields_cannot_smuggle_privileges(client: TestClient, admin: dict[str, str]) -> None:
    for field in ("role", "created_by", "owner", "status"):
        assert_problem(client.post("/api/v1/projects", json={"name": "x1", field: "admin"}, headers=admin), 422, field)
    assert client.get("/api/v1/projects", headers=admin).json() == []


def test_a_key_never_sees_another_projects_objects(
    client: TestClient, make_project: Callable[[str], str], make_key: Callable[..., dict[str, str]]
) -> None:
    make_project("alpha")
    make_project("beta")
    for role in ("viewer", "engineer"):
        key = make_key(role, "alpha")
        assert [p["name"] for p in client.get("/api/v1/projects", headers=key).json()] == ["alpha"]
        assert client.get("/api/v1/projects/alpha", headers=key).status_code == 200
        missing = assert_problem(client.get("/api/v1/projects/ghost", headers=key), 404, "ghost")
        hidden = assert_problem(client.get("/api/v1/projects/beta", headers=key), 404, "beta")
        # Exactly as for a project that does not exist: nothing tells them apart.
        assert missing["detail"].replace("ghost", "X") == hidden["detail"].replace("beta", "X")  # type: ignore[union-attr]


def test_key_with_two_projects_sees_both(
    client: TestClient, make_project: Callable[[str], str], make_key: Callable[..., dict[str, str]]
) -> None:
    for name in ("alpha", "beta", "gamma"):
        make_project(name)
    key = make_key("viewer", "alpha", "gamma")
    assert [p["name"] for p in client.get("/api/v1/projects", headers=key).json()] == ["alpha", "gamma"]
