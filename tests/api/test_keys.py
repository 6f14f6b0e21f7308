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


def _whoami(client: TestClient, key: str) -> int | str:
    answer = client.get("/api/v1/auth/whoami", headers={"X-API-Key": key})
    return answer.json()["role"] if answer.status_code == 200 else answer.status_code


def test_keys_given_in_the_settings_are_stored_as_they_are_and_written_nowhere(db_url: str, tmp_path: Path) -> None:
    """Kubernetes shares no folder between pods: the admin, worker and inference keys come from a
    Secret, made beforehand with `miniml new-key`, and the api stores their hashes on start."""
    from miniml.services.keys import new_raw_key

    admin, worker, inference = new_raw_key(), new_raw_key(), new_raw_key()
    settings = Settings(
        data_dir=tmp_path / "d",
        db={"url": db_url},
        auth={"admin_key": admin},
        worker={"api_key": worker},
        inference={"api_key": inference},
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert [_whoami(client, k) for k in (admin, worker, inference)] == ["admin", "worker", "inference"]
        assert _whoami(client, new_raw_key()) == 401
        keys = client.get("/api/v1/keys", headers={"X-API-Key": admin}).json()
        assert sorted(k["role"] for k in keys) == ["admin", "inference", "worker"]
    assert sorted(p.name for p in (tmp_path / "d").glob("*.key")) == []  # no file holds any of them

    # A restart with the same Secret changes nothing; a new admin key given later is not an admin.
    later = settings.model_copy(update={"auth": settings.auth.model_copy(update={"admin_key": new_raw_key()})})
    with TestClient(create_app(later), raise_server_exceptions=False) as client:
        assert _whoami(client, admin) == "admin" and _whoami(client, str(later.auth.admin_key)) == 401
        assert len(client.get("/api/v1/keys", headers={"X-API-Key": admin}).json()) == 3


def test_a_given_key_that_clashes_or_is_malformed_stops_the_start_with_its_setting_named(
    tmp_path: Path,
) -> None:
    from pydantic import ValidationError

    from miniml.services.keys import new_raw_key

    with pytest.raises(ValidationError, match=r"worker\.api_key"):
        Settings(data_dir=tmp_path / "d", worker={"api_key": "hunter2"})
    worker = new_raw_key()
    settings = Settings(data_dir=tmp_path / "d", worker={"api_key": worker})
    with TestClient(create_app(settings), raise_server_exceptions=False):
        pass
    key_id = worker.split("_")[1]
    clash = f"mml_{key_id}_{new_raw_key().split('_', 2)[2]}"  # the same id, another secret
    other = settings.model_copy(update={"worker": settings.worker.model_copy(update={"api_key": clash})})
    with (
        pytest.raises(ValueError, match=r"MINIML_WORKER__API_KEY: key id \w+ is already taken"),
        TestClient(create_app(other), raise_server_exceptions=False),
    ):
        pass
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:  # the first key still works
        assert _whoami(client, worker) == "worker"


@pytest.mark.postgres
def test_two_replicas_storing_the_same_given_key_at_once_both_start(pg_url: str) -> None:
    """Kubernetes starts api replicas together on a new database: the second insert of a given key
    waits on the first's, then finds it instead of failing the start."""
    import threading

    from miniml.db.engine import make_engine, make_sessionmaker, upgrade
    from miniml.domain.roles import Role
    from miniml.services.keys import new_raw_key, register_given_key

    engine = make_engine(pg_url, connect_timeout_s=30)
    upgrade(engine)
    db = make_sessionmaker(engine)
    key = new_raw_key()
    results: list[bool | BaseException] = []
    first = db()
    try:
        first.begin()
        assert register_given_key(first, key, Role.worker, what="MINIML_WORKER__API_KEY") is True

        def second() -> None:
            try:
                with db.begin() as session:
                    results.append(register_given_key(session, key, Role.worker, what="MINIML_WORKER__API_KEY"))
            except BaseException as exc:
                results.append(exc)

        thread = threading.Thread(target=second)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive()  # waiting on the first replica's uncommitted row
        first.commit()
        thread.join(30)
    finally:
        first.close()
    assert results == [False]
    engine.dispose()
