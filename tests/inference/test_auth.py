"""The inference service checks each caller's own credential against a real api, never its own:
every operation of its OpenAPI document x {no credential, garbage, tampered token, each role,
another project's key}, admin routes for admins, revocation within 2 s, nothing told to anonymous callers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from miniml.config import Settings
from miniml.inference.app import create_inference_app
from tests.conftest import LiveApi, assert_problem, free_port

PUBLIC = {"/healthz", "/readyz", "/v2/health/ready", "/v2/health/live"}
# Routes the OpenAPI document hides but which exist all the same.
HIDDEN = [("GET", "/metrics")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveApi, TestClient, dict[str, dict[str, str]]]]:
    tmp: Path = tmp_path_factory.mktemp("inference-auth")
    settings = Settings(
        data_dir=tmp / "data",
        api={"port": free_port()},
        mlflow={"port": free_port()},
        prefect={"port": free_port()},
        inference={"port": free_port(), "reconcile_s": 0.5},
    )
    with LiveApi(settings) as api:
        for name in ("demo", "other"):
            httpx.post(f"{api.url}/api/v1/projects", json={"name": name}, headers=api.headers).raise_for_status()

        def key(role: str, *projects: str) -> dict[str, str]:
            body = {"role": role, "projects": list(projects)}
            made = httpx.post(f"{api.url}/api/v1/keys", json=body, headers=api.headers)
            made.raise_for_status()
            return {"X-API-Key": made.json()["key"], "id": made.json()["id"]}

        token = httpx.post(f"{api.url}/api/v1/auth/token", headers=api.headers).json()["access_token"]
        head, body, sig = token.split(".")
        callers = {
            "none": {},
            "garbage": {"Authorization": "x"},
            "garbage-key": {"X-API-Key": "mml_0_0"},
            "basic": {"Authorization": "Basic YWRtaW46YWRtaW4="},
            "tampered": {"Authorization": f"Bearer {head}.{body}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"},
            "viewer": key("viewer", "demo"),
            "engineer": key("engineer", "demo"),
            "admin": api.headers,
            "admin-token": {"Authorization": f"Bearer {token}"},
            "worker": {"X-API-Key": api.worker_key},
            "inference": {"X-API-Key": api.inference_key},
            # What the api sends with a push: a short token for the inference service's key.
            "inference-token": {
                "Authorization": "Bearer "
                + httpx.post(f"{api.url}/api/v1/auth/token", headers={"X-API-Key": api.inference_key}).json()[
                    "access_token"
                ]
            },
            "other-project": key("engineer", "other"),
        }
        with TestClient(create_inference_app(settings), raise_server_exceptions=False) as inference:
            yield api, inference, callers


def operations(inference: TestClient) -> list[tuple[str, str]]:
    doc = inference.get("/openapi.json").json()
    ops = [(m.upper(), p) for p, item in doc["paths"].items() for m in item]
    return sorted({*ops, *HIDDEN})


BAD = ("none", "garbage", "garbage-key", "basic", "tampered")


def test_every_operation_checks_the_callers_own_credential(
    served: tuple[LiveApi, TestClient, dict[str, dict[str, str]]],
) -> None:
    _api, inference, callers = served
    ops = operations(inference)
    assert ("POST", "/v1/endpoints/{name}/predict") in ops and ("POST", "/admin/reconcile") in ops
    for method, path in ops:
        url = path.replace("{name}", "nope")
        for who, headers in callers.items():
            send = {k: v for k, v in headers.items() if k != "id"}
            response = inference.request(method, url, headers=send, json={"rows": [{"x": 1}]})
            if path in PUBLIC or (path == "/metrics"):
                assert response.status_code in (200, 503), (method, path, who)
                continue
            if who in BAD:
                assert_problem(response, 401)
                assert 'Bearer realm="miniml"' in response.headers["www-authenticate"], (path, who)
            elif path == "/admin/reconcile":
                if who in ("admin", "admin-token", "inference", "inference-token"):
                    assert response.status_code == 202, (who, response.text)
                else:
                    assert_problem(response, 403, "admin")
            else:  # a valid caller: the endpoint does not exist for anyone here
                assert_problem(response, 404)


def test_anonymous_callers_learn_no_deployment_names(
    served: tuple[LiveApi, TestClient, dict[str, dict[str, str]]],
) -> None:
    _api, inference, _callers = served
    body = inference.get("/readyz").json()
    assert set(body) == {"ready", "deployments", "failing"}
    assert all(isinstance(v, bool | int) for v in body.values())


def test_a_revoked_key_stops_predicting_within_2_s(
    served: tuple[LiveApi, TestClient, dict[str, dict[str, str]]],
) -> None:
    api, inference, _callers = served
    made = httpx.post(f"{api.url}/api/v1/keys", json={"role": "viewer", "projects": ["demo"]}, headers=api.headers)
    key, key_id = made.json()["key"], made.json()["id"]
    url = "/v1/endpoints/nope/predict"
    for _ in range(20):  # warm the cache under steady traffic
        assert inference.post(url, headers={"X-API-Key": key}, json={}).status_code == 404
    assert httpx.delete(f"{api.url}/api/v1/keys/{key_id}", headers=api.headers).status_code == 200
    revoked = time.monotonic()
    while inference.post(url, headers={"X-API-Key": key}, json={}).status_code != 401:
        assert time.monotonic() - revoked < 2.0, "a revoked key still predicted 2 s after revocation"
        time.sleep(0.05)


def test_a_declared_oversized_body_is_413_before_anything_is_read(
    served: tuple[LiveApi, TestClient, dict[str, dict[str, str]]],
) -> None:
    _api, inference, callers = served
    limit = Settings().inference.max_body_bytes
    big = b'{"rows": [' + b"0," * ((limit // 2) + 10) + b"0]}"
    response = inference.post(
        "/v1/endpoints/nope/predict", content=big, headers={**callers["admin"], "content-type": "application/json"}
    )
    assert_problem(response, 413, "larger than")
