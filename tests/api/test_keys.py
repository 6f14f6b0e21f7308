"""Project grants of a key: replaced by an admin, in force at once, and every bad change refused
with nothing changed (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from miniml.api.app import create_app
from miniml.config import Settings
from tests.conftest import assert_problem


@pytest.fixture
def keyed(db_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(data_dir=tmp_path / "d", db={"url": db_url})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        admin = {"X-API-Key": (settings.data_dir / "admin.key").read_text().strip()}
        for name in ("alpha", "beta"):
            assert client.post("/api/v1/projects", json={"name": name}, headers=admin).status_code == 201
        yield client, admin


def _key(client: TestClient, admin: dict[str, str], role: str, *projects: str) -> tuple[str, dict[str, str]]:
    made = client.post("/api/v1/keys", json={"role": role, "projects": list(projects)}, headers=admin).json()
    return made["id"], {"X-API-Key": made["key"]}


def _grants(client: TestClient, admin: dict[str, str], key_id: str) -> list[str]:
    return next(k["projects"] for k in client.get("/api/v1/keys", headers=admin).json() if k["id"] == key_id)


def test_new_grants_apply_at_once_to_the_key_and_its_tokens(keyed: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = keyed
    key_id, engineer = _key(client, admin, "engineer", "alpha")
    token = client.post("/api/v1/auth/token", headers=engineer).json()["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/projects/beta", headers=engineer).status_code == 404
    changed = client.put(f"/api/v1/keys/{key_id}/projects", json={"projects": ["beta", "alpha"]}, headers=admin)
    assert changed.status_code == 200 and changed.json()["projects"] == ["alpha", "beta"]
    for who in (engineer, bearer):
        assert client.get("/api/v1/projects/beta", headers=who).status_code == 200
    client.put(f"/api/v1/keys/{key_id}/projects", json={"projects": ["beta"]}, headers=admin)
    for who in (engineer, bearer):
        assert client.get("/api/v1/projects/alpha", headers=who).status_code == 404
    events = client.get("/api/v1/audit", headers=admin).json()
    assert any(e["action"] == "PUT /api/v1/keys/{key_id}/projects" and e["status"] == 200 for e in events)


def test_bad_grant_changes_are_refused_and_change_nothing(keyed: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = keyed
    key_id, engineer = _key(client, admin, "engineer", "alpha")
    admin_id = client.post("/api/v1/keys", json={"role": "admin"}, headers=admin).json()["id"]
    revoked_id, _ = _key(client, admin, "viewer", "alpha")
    client.delete(f"/api/v1/keys/{revoked_id}", headers=admin)
    for target, body, who, status, needle in (
        (key_id, {"projects": []}, admin, 422, "projects"),
        (key_id, {"projects": ["alpha", "nope"]}, admin, 422, "nope"),
        (key_id, {"projects": ["Bad Name"]}, admin, 422, "Bad Name"),
        (key_id, {}, admin, 422, "projects"),
        (key_id, {"projects": ["beta"]}, engineer, 403, "admin"),
        (key_id, {"projects": ["beta"]}, {}, 401, "key"),
        ("nosuchkey", {"projects": ["beta"]}, admin, 404, "nosuchkey"),
        (admin_id, {"projects": ["beta"]}, admin, 422, "every project"),
        (revoked_id, {"projects": ["beta"]}, admin, 409, "revoked"),
    ):
        assert_problem(client.put(f"/api/v1/keys/{target}/projects", json=body, headers=who), status, needle)
    assert _grants(client, admin, key_id) == ["alpha"] and _grants(client, admin, revoked_id) == ["alpha"]
    assert _grants(client, admin, admin_id) == []
