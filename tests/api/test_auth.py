"""Role matrix, 401 cases, key storage and tokens."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import jwt
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select

from miniml.api.app import create_app
from miniml.config import Settings
from miniml.db import tables
from miniml.domain.roles import Role
from miniml.domain.tenancy import Caller
from miniml.services import keys as key_service
from tests.conftest import assert_problem

PUBLIC = {"/healthz", "/readyz", "/metrics", "/api/v1/auth/token"}


Needed = Role | str  # a Role, or "any": every valid key or token, services included


def needed_role(route: APIRoute) -> Needed | None:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        role = getattr(dep.call, "needed_role", None)
        if role is not None:
            return role if role == "any" else Role(role)
        stack.extend(dep.dependencies)
    return None


def api_routes() -> list[tuple[str, str, Needed]]:
    """Every operation of the api, read from the app: one added without a declared permission fails here."""
    app = create_app(Settings(data_dir="/tmp/miniml-route-listing"))
    out = []
    # Included routers are kept whole (FastAPI >= 0.150); their routes carry the full path.
    flat: list[object] = []
    for inc in app.routes:
        router = getattr(inc, "original_router", None)
        flat.extend(router.routes if router is not None else [inc])
    for route in flat:
        if not isinstance(route, APIRoute):
            continue
        if route.path.startswith("/ui"):
            continue  # the console: no permission of its own, it calls these routes (tests/console)
        role = needed_role(route)
        if route.path in PUBLIC:
            assert role is None
            continue
        assert role is not None, f"{route.path} declares no role"
        out.extend((method, route.path, role) for method in sorted(route.methods))
    return out


ROUTES = api_routes()
_ID_PARAMS = re.compile(r"\{(job_id|report_id|retraining_id|version)\}")
CALLERS = ["none", "garbage", "tampered", *(r.value for r in Role), "other-project"]


def _url(path: str) -> str:
    url = path.replace("{project}", "demo")
    url = _ID_PARAMS.sub("1", url)
    return re.sub(r"\{[^}]+\}", "nope", url)


def _allowed(role: Role, needed: Needed) -> bool:
    return needed == "any" or role.allows(Role(needed))


@pytest.mark.parametrize(("method", "path", "needed"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_role_matrix(
    client: TestClient,
    admin: dict[str, str],
    make_project: Callable[[str], str],
    make_key: Callable[..., dict[str, str]],
    method: str,
    path: str,
    needed: Needed,
) -> None:
    """{no credential, garbage, tampered token, every role, another project's key} x this operation."""
    make_project("demo")
    make_project("other")
    url = _url(path)
    token = client.post("/api/v1/auth/token", headers=admin).json()["access_token"]
    head, body, sig = token.split(".")
    for who in CALLERS:
        if who == "none":
            headers: dict[str, str] = {}
        elif who == "garbage":
            headers = {"Authorization": "x"}
        elif who == "tampered":
            headers = {"Authorization": f"Bearer {head}.{body}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"}
        elif who == "other-project":
            headers = make_key("engineer", "other")
        else:
            role = Role(who)
            needs_project = role in (Role.viewer, Role.engineer)
            headers = make_key(who, *(["demo"] if needs_project else []))
        response = client.request(method, url, headers=headers, json={})
        if who in ("none", "garbage", "tampered"):
            assert_problem(response, 401)
            assert "Bearer" in response.headers["www-authenticate"], who
        elif who == "other-project":
            if not _allowed(Role.engineer, needed):
                assert_problem(response, 403)
            elif "{project}" in path:
                # Another tenant's project does not exist for this key; a body it cannot see is never read.
                assert response.status_code in (404, 422), (who, response.text)
                if response.status_code == 404:
                    assert_problem(response, 404, "demo")
        elif _allowed(Role(who), needed):
            assert response.status_code not in (401, 403), (who, response.text)
        else:
            assert_problem(response, 403, str(needed), who)


def test_every_v1_route_declares_a_role() -> None:
    assert len(ROUTES) >= 8
    assert {r for *_x, r in ROUTES} >= {Role.viewer, Role.engineer, Role.admin, Role.worker, Role.inference}


WORKER_ONLY = sorted({p for _m, p, r in ROUTES if r is Role.worker})


def test_job_lifecycle_and_result_routes_are_the_workers_alone() -> None:
    """The worker-only routes are exactly the job lifecycle and the monitoring results."""
    assert {p.rsplit("/", 1)[-1] for p in WORKER_ONLY} == {
        "start",
        "heartbeat",
        "claim",
        "trials",
        "logs",
        "run",
        "finalize",
        "finish",
        "context",
        "result",
    }


@pytest.mark.parametrize(
    ("headers", "needle"),
    [
        ({}, "missing credentials"),
        ({"X-API-Key": "not-a-key"}, "malformed"),
        ({"X-API-Key": "mml_000000000000_" + "x" * 43}, "unknown api key"),
        ({"Authorization": "Bearer not.a.jwt"}, "invalid access token"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "missing credentials"),
    ],
)
def test_bad_credentials_answer_401(client: TestClient, headers: dict[str, str], needle: str) -> None:
    assert_problem(client.get("/api/v1/projects", headers=headers), 401, needle)


def test_wrong_secret_for_existing_key_id_is_401(client: TestClient, admin_key: str) -> None:
    key_id = admin_key.split("_")[1]
    assert_problem(client.get("/api/v1/projects", headers={"X-API-Key": f"mml_{key_id}_{'A' * 43}"}), 401, "unknown")


def test_revoked_key_and_its_tokens_answer_401(
    client: TestClient,
    admin: dict[str, str],
    make_project: Callable[[str], str],
    make_key: Callable[..., dict[str, str]],
) -> None:
    make_project("demo")
    headers = make_key("viewer", "demo")
    token = client.post("/api/v1/auth/token", headers=headers).json()["access_token"]
    key_id = headers["X-API-Key"].split("_")[1]
    assert client.get("/api/v1/projects", headers=headers).status_code == 200
    assert client.delete(f"/api/v1/keys/{key_id}", headers=admin).json()["revoked_at"]
    assert_problem(client.get("/api/v1/projects", headers=headers), 401, "revoked")
    assert_problem(client.get("/api/v1/projects", headers={"Authorization": f"Bearer {token}"}), 401, "revoked")


def test_expired_key_answers_401(
    client: TestClient, make_project: Callable[[str], str], make_key: Callable[..., dict[str, str]]
) -> None:
    make_project("demo")
    # 3 s of life: enough for the first call on a loaded machine, then it runs out.
    headers = make_key("viewer", "demo", expires_in_days=3 / 86400)
    assert client.get("/api/v1/projects", headers=headers).status_code == 200
    time.sleep(3.2)
    assert_problem(client.get("/api/v1/projects", headers=headers), 401, "expired")


def test_tampered_and_expired_tokens_answer_401(client: TestClient, admin: dict[str, str]) -> None:
    token = client.post("/api/v1/auth/token", headers=admin).json()["access_token"]
    assert client.get("/api/v1/projects", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode({**claims, "role": "admin"}, "guessed-secret", algorithm="HS256")
    assert_problem(client.get("/api/v1/projects", headers={"Authorization": f"Bearer {forged}"}), 401, "invalid")
    head, body, sig = token.split(".")
    flipped = head + "." + body + "." + ("A" if sig[0] != "A" else "B") + sig[1:]
    assert_problem(client.get("/api/v1/projects", headers={"Authorization": f"Bearer {flipped}"}), 401, "invalid")
    caller = Caller(claims["sub"], Role.admin, None)
    expired = key_service.issue_token(caller, secret=client.app.state.jwt_secret, ttl_s=-5)  # type: ignore[attr-defined]
    assert_problem(client.get("/api/v1/projects", headers={"Authorization": f"Bearer {expired}"}), 401, "expired")


def test_keys_are_shown_once_and_stored_hashed(
    client: TestClient, admin: dict[str, str], make_project: Callable[[str], str]
) -> None:
    make_project("demo")
    created = client.post("/api/v1/keys", json={"role": "engineer", "projects": ["demo"]}, headers=admin).json()
    raw = created["key"]
    secret = raw.split("_", 2)[2]
    assert len(secret) >= 43  # 32 random bytes, urlsafe base64
    listed = client.get("/api/v1/keys", headers=admin).json()
    assert all("key" not in k and "secret_hash" not in k for k in listed)
    with client.app.state.db.begin() as session:  # type: ignore[attr-defined]
        row = session.scalar(select(tables.ApiKey).where(tables.ApiKey.id == created["id"]))
        assert row is not None and secret not in row.secret_hash and raw not in row.secret_hash
    assert client.get("/api/v1/projects", headers={"X-API-Key": raw}).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"role": "engineer"}, 422, "at least one project"),
        ({"role": "viewer", "projects": ["ghost"]}, 422, "ghost"),
        ({"role": "admin", "projects": ["demo"]}, 422, "leave 'projects' empty"),
        ({"role": "root", "projects": ["demo"]}, 422, "role"),
        ({"role": "viewer", "projects": ["demo"], "is_admin": True}, 422, "is_admin"),
    ],
)
def test_bad_key_requests_create_nothing(
    client: TestClient,
    admin: dict[str, str],
    make_project: Callable[[str], str],
    body: dict[str, object],
    status: int,
    needle: str,
) -> None:
    make_project("demo")
    before = client.get("/api/v1/keys", headers=admin).json()
    assert_problem(client.post("/api/v1/keys", json=body, headers=admin), status, needle)
    assert client.get("/api/v1/keys", headers=admin).json() == before


def test_bootstrap_keys_are_private_and_never_printed_to_a_log(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """The admin key and the service keys land in 0600 files; stdout (a log file under miniml up) never holds them."""
    with TestClient(create_app(settings)):
        pass
    files = {name: settings.data_dir / f"{name}.key" for name in ("admin", "worker", "inference")}
    raw = {name: path.read_text().strip() for name, path in files.items()}
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in files.values())
    out = capsys.readouterr().out
    assert str(files["admin"]) in out
    assert not any(key in out for key in raw.values())
    with TestClient(create_app(settings)) as again:
        assert again.get("/api/v1/keys", headers={"X-API-Key": raw["admin"]}).status_code == 200
        roles = {k["role"] for k in again.get("/api/v1/keys", headers={"X-API-Key": raw["admin"]}).json()}
        assert roles == {"admin", "worker", "inference"}
        # The service keys are not a person's: no admin route answers them.
        assert_problem(again.get("/api/v1/keys", headers={"X-API-Key": raw["worker"]}), 403, "worker")
    assert not any(key in capsys.readouterr().out for key in raw.values())
    assert {name: path.read_text().strip() for name, path in files.items()} == raw
