"""Models, deployments and the inference service against a live api and a real MLflow server."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression

from miniml.config import Settings
from miniml.inference.app import create_inference_app
from miniml.sdk.client import Client
from miniml.tracking.runs import Tracker
from miniml.tracking.signing import signing_key
from miniml.training.data import features_from_profile
from miniml.training.families import FAMILIES
from miniml.training.search import build_pipeline
from tests.conftest import LiveApi, assert_problem, free_port

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"
ROW = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


def register(tracker: Tracker, project: str, model: str, estimator: object, *, job: int = 7, settings: Settings) -> str:
    """Train and register a version as a worker would: signed with the platform's key."""
    frame = pd.read_csv(IRIS)
    profile = {
        "columns": [{"name": c, "kind": "numeric"} for c in frame.columns[:-1]]
        + [{"name": "target", "kind": "categorical"}]
    }
    features = features_from_profile(profile, "target")
    pipe = build_pipeline(features, FAMILIES["linear"], estimator).fit(frame[features.columns], frame["target"])
    run = tracker.start_job_run(
        project, job, {"miniml.dataset": "iris", "miniml.dataset_version": "1", "miniml.dataset_sha256": "abc"}
    )
    return tracker.log_model(
        run,
        pipe,
        FAMILIES["linear"],
        frame[features.columns].head(3),
        registered=f"{project}.{model}",
        params={"family": "linear"},
        metrics={"f1_macro": 0.9 if job == 7 else 0.3},
        signing_key=signing_key(settings.auth.model_signing_key, settings.data_dir),
    )


@pytest.fixture
def stack(tmp_path: Path, mlflow_uri: str) -> Iterator[tuple[LiveApi, Client, TestClient, str]]:
    """A live api, an in-process inference service, and a project with model 'iris' v1 (logistic) and v2 (constant)."""
    with _stack(tmp_path, mlflow_uri) as made:
        yield made


@pytest.fixture(scope="module")
def shared_stack(
    tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str
) -> Iterator[tuple[LiveApi, Client, TestClient, str]]:
    """One stack for the cases of a table of bad inputs (each leaves it as it found it)."""
    with _stack(tmp_path_factory.mktemp("shared"), mlflow_uri) as made:
        yield made


@contextlib.contextmanager
def _stack(tmp_path: Path, mlflow_uri: str) -> Iterator[tuple[LiveApi, Client, TestClient, str]]:
    project = f"p{uuid.uuid4().hex[:8]}"
    inference_port = free_port()
    settings = Settings(
        data_dir=tmp_path / "d",
        api={"port": free_port()},
        prefect={"port": free_port()},
        mlflow={"tracking_uri": mlflow_uri},
        inference={"port": inference_port, "reconcile_s": 0.5, "key_cache_s": 0},
    )
    tracker = Tracker(mlflow_uri)
    with LiveApi(settings) as api:
        client = Client(api.url, api_key=api.key)
        client.projects.create(project)
        assert register(tracker, project, "iris", LogisticRegression(max_iter=500), settings=settings) == "1"
        assert (
            register(
                tracker,
                project,
                "iris",
                DummyClassifier(strategy="constant", constant="Iris-virginica"),
                job=8,
                settings=settings,
            )
            == "2"
        )
        with TestClient(create_inference_app(settings)) as inference:
            yield api, client, inference, project


def wait_served(inference: TestClient, name: str, versions: set[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        served = inference.app.state.state.served.get(name)  # type: ignore[attr-defined]
        if served is not None and {v.version for v in served.variants} == versions:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never served {versions}")


def predict(
    inference: TestClient, name: str, key: str, rows: list[dict[str, object]] | None = None, **params: str
) -> object:
    return inference.post(
        f"/v1/endpoints/{name}/predict", json={"rows": rows or [ROW]}, headers={"X-API-Key": key}, params=params
    )


def test_models_api_lists_versions_with_lineage_and_compares(stack: tuple[LiveApi, Client, TestClient, str]) -> None:
    api, _client, _inf, project = stack
    h = api.headers
    models = api_get(api, f"/api/v1/projects/{project}/models")
    assert [m["name"] for m in models] == ["iris"] and models[0]["registered_name"] == f"{project}.iris"
    versions = api_get(api, f"/api/v1/projects/{project}/models/iris/versions")
    assert [v["version"] for v in versions] == ["1", "2"]
    assert versions[0]["job_id"] == 7 and versions[0]["dataset"] == "iris" and versions[0]["dataset_sha256"] == "abc"
    assert versions[0]["metrics"]["test_f1_macro"] == 0.9
    comparison = api_get(api, f"/api/v1/projects/{project}/models/iris/compare?a=1&b=2")
    assert comparison["metric_differences"]["test_f1_macro"] == pytest.approx(0.3 - 0.9)
    import httpx

    assert_problem(
        httpx.get(f"{api.url}/api/v1/projects/{project}/models/nope/versions", headers=h), 404, "does not exist"
    )
    # A name no model can have (MLflow calls it an invalid parameter) does not exist either, on every route.
    for path in ("", "/versions", "/versions/1", "/versions/1/plots", "/versions/1/plots/confusion_matrix"):
        url = f"{api.url}/api/v1/projects/{project}/models/%3A%F0%BB%AD%96%3Ex{path}"
        assert_problem(httpx.get(url, headers=h), 404, "does not exist")
    assert api_get(api, f"/api/v1/projects/{project}/models/iris/versions/1/plots") == []  # registered, not trained


def api_get(api: LiveApi, path: str) -> object:
    import httpx

    response = httpx.get(api.url + path, headers=api.headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_promotion_roles_and_the_seed_route(stack: tuple[LiveApi, Client, TestClient, str]) -> None:
    import httpx

    api, client, _inf, project = stack
    engineer = client.keys.create("engineer", projects=[project]).key
    url = f"{api.url}/api/v1/projects/{project}/models/iris/versions/1/promote"
    staged = httpx.post(url, json={"stage": "Staging"}, headers={"X-API-Key": engineer})
    assert staged.status_code == 200 and staged.json()["aliases"] == ["staging"] and staged.json()["stage"] == "Staging"
    assert_problem(httpx.post(url, json={"stage": "production"}, headers={"X-API-Key": engineer}), 403, "admin")
    assert_problem(httpx.post(url, json={"stage": "archived"}, headers=api.headers), 422, "staging")
    seed = httpx.post(
        f"{api.url}/models/promote",
        json={"model_name": f"{project}.iris", "version": 2, "to_stage": "Production"},
        headers=api.headers,
    )
    assert seed.status_code == 200 and seed.json()["aliases"] == ["production"]
    assert api_get(api, f"/api/v1/projects/{project}/models/iris")["aliases"] == {"staging": "1", "production": "2"}


def test_production_approval_request_approve_reject_roles_and_audit(
    stack: tuple[LiveApi, Client, TestClient, str],
) -> None:
    """SageMaker's approval: an engineer asks with a note; only an admin approves (the version becomes
    production) or rejects (nothing moves); the status, who and why are on the version and in the
    audit log; a viewer and bad bodies are refused with nothing changed."""
    import httpx

    api, client, _inf, project = stack
    engineer_key = client.keys.create("engineer", projects=[project])
    viewer = client.keys.create("viewer", projects=[project]).key
    engineer = engineer_key.key
    url = f"{api.url}/api/v1/projects/{project}/models/iris/versions/{{v}}/approval"

    def versions() -> dict[str, object]:
        return {v["version"]: v for v in api_get(api, f"/api/v1/projects/{project}/models/iris/versions")}  # type: ignore[union-attr]

    before = versions()
    assert before["1"]["approval"] is None
    for body, who, status, needle in (
        ({"action": "request", "note": "ok"}, viewer, 403, "engineer"),
        ({"action": "approve", "note": "ok"}, engineer, 403, "admin"),
        ({"action": "request"}, engineer, 422, "note"),
        ({"action": "request", "note": ""}, engineer, 422, "note"),
        ({"action": "ship", "note": "x"}, engineer, 422, "action"),
    ):
        assert_problem(httpx.post(url.format(v=1), json=body, headers={"X-API-Key": who}), status, needle)
    assert versions() == before  # nothing was written
    asked = httpx.post(
        url.format(v=1), json={"action": "request", "note": "beats v2 on f1"}, headers={"X-API-Key": engineer}
    )
    assert asked.status_code == 200, asked.text
    approval = asked.json()["approval"]
    assert approval["status"] == "pending" and approval["requested_by"] == engineer_key.id
    assert approval["request_note"] == "beats v2 on f1" and "production" not in asked.json()["aliases"]
    again = httpx.post(url.format(v=1), json={"action": "request", "note": "again"}, headers={"X-API-Key": engineer})
    assert_problem(again, 409, "already waits")
    approved = httpx.post(url.format(v=1), json={"action": "approve", "note": "checked the plots"}, headers=api.headers)
    assert approved.status_code == 200, approved.text
    decided = approved.json()["approval"]
    assert decided["status"] == "approved" and decided["decision_note"] == "checked the plots" and decided["decided_by"]
    assert "production" in approved.json()["aliases"]
    rejected = httpx.post(url.format(v=2), json={"action": "reject", "note": "constant model"}, headers=api.headers)
    assert rejected.status_code == 200 and rejected.json()["approval"]["status"] == "rejected"
    assert api_get(api, f"/api/v1/projects/{project}/models/iris")["aliases"]["production"] == "1"  # type: ignore[index]
    events = api_get(api, f"/api/v1/audit?project={project}")
    notes = {e["detail"] for e in events if e["action"].endswith("/approval")}  # type: ignore[union-attr,index]
    assert {"request: beats v2 on f1", "approve: checked the plots", "reject: constant model"} <= notes


def test_deploy_predict_update_rollback_and_restart(
    stack: tuple[LiveApi, Client, TestClient, str], mlflow_uri: str
) -> None:
    import httpx

    api, _client, inference, project = stack
    httpx.post(
        f"{api.url}/api/v1/projects/{project}/models/iris/versions/1/promote",
        json={"stage": "staging"},
        headers=api.headers,
    )
    dep = httpx.post(
        f"{api.url}/deploy", json={"model_name": f"{project}.iris", "stage": "Staging"}, headers=api.headers
    )
    assert dep.status_code == 201, dep.text
    name = dep.json()["name"]
    assert name == "iris" and dep.json()["desired"] == [{"version": "1", "weight": 100}]
    wait_served(inference, name, {"1"})
    seed = inference.post("/predict", json={"rows": [ROW]}, headers=api.headers)
    assert seed.json() == {"preds": ["Iris-setosa"]}
    first = predict(inference, name, api.key).json()  # type: ignore[attr-defined]
    assert first["model_version"] == "1" and first["deployment"] == name
    # Promote v2 to staging: the deployment follows the alias.
    httpx.post(
        f"{api.url}/api/v1/projects/{project}/models/iris/versions/2/promote",
        json={"stage": "staging"},
        headers=api.headers,
    )
    wait_served(inference, name, {"2"})
    assert predict(inference, name, api.key).json()["predictions"] == ["Iris-virginica"]  # type: ignore[attr-defined]
    # Pin version 1, then roll back to the alias.
    patched = httpx.patch(
        f"{api.url}/api/v1/projects/{project}/deployments/{name}", json={"target": 1}, headers=api.headers
    )
    assert patched.json()["desired"] == [{"version": "1", "weight": 100}]
    wait_served(inference, name, {"1"})
    rolled = httpx.post(f"{api.url}/api/v1/projects/{project}/deployments/{name}/rollback", headers=api.headers)
    assert rolled.json()["target"] == {"kind": "alias", "alias": "staging"}
    wait_served(inference, name, {"2"})
    history = api_get(api, f"/api/v1/projects/{project}/deployments/{name}/history")
    assert [e["action"] for e in history] == ["create", "update", "rollback"]
    deadline = time.monotonic() + 10
    while (
        not (read := api_get(api, f"/api/v1/projects/{project}/deployments/{name}"))["ready"]
        and time.monotonic() < deadline
    ):  # type: ignore[index]
        time.sleep(0.3)
    assert read["ready"] and read["replicas"][0]["versions"] == ["2"]  # type: ignore[index]
    # A version a deployment serves cannot be deleted.
    assert_problem(
        httpx.delete(f"{api.url}/api/v1/projects/{project}/models/iris/versions/2", headers=api.headers), 409, "served"
    )
    # A fresh replica serves the same deployments without being told anything.
    with TestClient(create_inference_app(api.settings)) as again:
        wait_served(again, name, {"2"})
        assert again.get("/readyz").status_code == 200
        assert predict(again, name, api.key).json()["model_version"] == "2"  # type: ignore[attr-defined]


def test_traffic_split_routes_by_weight(stack: tuple[LiveApi, Client, TestClient, str]) -> None:
    import httpx

    api, _client, inference, project = stack
    body = {
        "name": f"split-{project}",
        "model_name": "iris",
        "traffic": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}],
    }
    assert (
        httpx.post(f"{api.url}/api/v1/projects/{project}/deployments", json=body, headers=api.headers).status_code
        == 201
    )
    wait_served(inference, body["name"], {"1", "2"})
    inference.app.state.link.key_cache_s = 60  # type: ignore[attr-defined]  # 1,200 requests, one key check
    served = Counter(predict(inference, body["name"], api.key).json()["model_version"] for _ in range(1200))  # type: ignore[attr-defined]
    share = served["2"] / 1200
    assert 0.065 <= share <= 0.135, served  # 10% ± about 4 standard deviations


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"rows": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4}]}, 422, "'petal_width' is missing"),
        ({"rows": [{**ROW, "petal_width": "wide"}]}, 422, "'petal_width' needs a number; row 1"),
        ({"rows": [ROW, {**ROW, "sepal_length": [1]}]}, 422, "row 2"),
        ({"rows": []}, 422, "no rows"),
        ({"rows": [ROW] * 11}, 422, "more than the 10"),
        ({"columns": ["sepal_length"], "data": [[1.0, 2.0]]}, 422, "row 1 has 2 values"),
        ({"instances": [ROW]}, 422, "petal_width"),
    ],
)
def test_bad_predict_inputs_name_the_problem(
    shared_stack: tuple[LiveApi, Client, TestClient, str], body: dict[str, object], status: int, needle: str
) -> None:
    import httpx

    api, _client, _inference, project = shared_stack
    httpx.post(
        f"{api.url}/api/v1/projects/{project}/deployments",
        json={"name": f"b-{project}", "model_name": "iris", "target": 1},
        headers=api.headers,
    )
    small_inference = api.settings.inference.model_copy(update={"max_rows": 10, "max_body_bytes": 4096})
    settings = api.settings.model_copy(update={"inference": small_inference})
    with TestClient(create_inference_app(settings)) as small:
        wait_served(small, f"b-{project}", {"1"})
        response = small.post(f"/v1/endpoints/b-{project}/predict", json=body, headers=api.headers)
        assert_problem(response, status, needle)
        raw = small.post(f"/v1/endpoints/b-{project}/predict", content=b"{oops", headers=api.headers)
        assert_problem(raw, 422, "not valid json")
        bom = b"\xef\xbb\xbf" + orjson.dumps({"rows": [ROW]})
        assert_problem(
            small.post(f"/v1/endpoints/b-{project}/predict", content=bom, headers=api.headers), 400, "byte-order"
        )
        # Over the body limit: refused by its declared length, and also when sent in chunks without one.
        big = orjson.dumps({"rows": [ROW] * 60})
        assert_problem(small.post(f"/v1/endpoints/b-{project}/predict", content=big, headers=api.headers), 413, "4,096")
        chunks = iter([big[:3000], big[3000:]])
        streamed = small.post(f"/v1/endpoints/b-{project}/predict", content=chunks, headers=api.headers)
        assert_problem(streamed, 413, "4,096")
        # A number beyond float range would reach the model as infinity (scikit-learn's own check is off).
        huge = b'{"rows": [{"sepal_length": 1e400, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]}'
        assert_problem(small.post(f"/v1/endpoints/b-{project}/predict", content=huge, headers=api.headers), 422)
        nan_ok = small.post(
            f"/v1/endpoints/b-{project}/predict", json={"rows": [{**ROW, "petal_width": None}]}, headers=api.headers
        )
        assert nan_ok.status_code == 200


def test_endpoint_auth_and_tenancy(stack: tuple[LiveApi, Client, TestClient, str]) -> None:
    import httpx

    api, client, inference, project = stack
    httpx.post(
        f"{api.url}/api/v1/projects/{project}/deployments",
        json={"name": f"t-{project}", "model_name": "iris", "target": 1},
        headers=api.headers,
    )
    wait_served(inference, f"t-{project}", {"1"})
    client.projects.create(f"o{project}")
    outsider = client.keys.create("viewer", projects=[f"o{project}"]).key
    viewer = client.keys.create("viewer", projects=[project]).key
    assert_problem(predict(inference, f"t-{project}", outsider), 404, "no endpoint")  # type: ignore[arg-type]
    assert_problem(predict(inference, "ghost", viewer), 404, "no endpoint")  # type: ignore[arg-type]
    assert predict(inference, f"t-{project}", viewer).status_code == 200  # type: ignore[attr-defined]
    assert_problem(inference.post(f"/v1/endpoints/t-{project}/predict", json={"rows": [ROW]}), 401, "api key")
    assert_problem(predict(inference, f"t-{project}", "mml_bad_key"), 401)  # type: ignore[arg-type]
    metrics = inference.get("/metrics").text
    assert f'miniml_inference_requests_total{{deployment="t-{project}",status="200",version="1"}}' in metrics


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"name": "Bad Name", "model_name": "iris"}, 422, "not valid"),
        ({"name": "x1", "model_name": "nope"}, 422, "does not exist"),
        ({"name": "x2", "model_name": "iris", "target": "production"}, 422, "no version with alias 'production'"),
        ({"name": "x3", "model_name": "iris", "target": 9}, 422, "version 9"),
        (
            {
                "name": "x4",
                "model_name": "iris",
                "traffic": [{"version": 1, "weight": 50}, {"version": 2, "weight": 40}],
            },
            422,
            "sum to 100",
        ),
        (
            {
                "name": "x5",
                "model_name": "iris",
                "target": 1,
                "traffic": [{"version": 1, "weight": 50}, {"version": 2, "weight": 50}],
            },
            422,
            "not both",
        ),
    ],
)
def test_bad_deployments_are_refused_and_create_nothing(
    shared_stack: tuple[LiveApi, Client, TestClient, str], body: dict[str, object], status: int, needle: str
) -> None:
    import httpx

    api, _client, _inf, project = shared_stack

    def deployments() -> list[tuple[str, object]]:  # the replicas' report times change; what is deployed must not
        return [(d["name"], d["desired"]) for d in api_get(api, f"/api/v1/projects/{project}/deployments")]  # type: ignore[attr-defined,index]

    before = deployments()
    assert_problem(
        httpx.post(f"{api.url}/api/v1/projects/{project}/deployments", json=body, headers=api.headers), status, needle
    )
    assert deployments() == before


def test_switching_versions_under_load_fails_no_request(
    tmp_path: Path, stack: tuple[LiveApi, Client, TestClient, str]
) -> None:
    import httpx
    import uvicorn

    api, _client, _inf, project = stack
    name = f"z-{project}"
    httpx.post(
        f"{api.url}/api/v1/projects/{project}/deployments",
        json={"name": name, "model_name": "iris", "target": 1},
        headers=api.headers,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_inference_app(api.settings), host="127.0.0.1", port=api.settings.inference.port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"{api.settings.inference_url}/v1/endpoints/{name}/predict"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        while httpx.post(url, json={"rows": [ROW]}, headers=api.headers).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        results: list[tuple[int, str]] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=10) as c:
                while not stop.is_set():
                    try:  # a request that errors is counted as failed, not lost with its thread
                        r = c.post(url, json={"rows": [ROW]}, headers=api.headers)
                    except httpx.HTTPError as exc:
                        results.append((0, type(exc).__name__))
                        continue
                    results.append((r.status_code, r.headers.get("x-model-version", "")))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        # Each switch is awaited on what the load itself sees (no fixed sleeps: a loaded machine
        # only makes the wait longer), then the load runs on it a little before the next one.
        for target in (2, 1, 2):
            httpx.patch(
                f"{api.url}/api/v1/projects/{project}/deployments/{name}", json={"target": target}, headers=api.headers
            )
            seen = len(results)
            deadline = time.monotonic() + 60
            while not any(v == str(target) for _, v in results[seen:]):
                assert time.monotonic() < deadline, f"version {target} was never served"
                time.sleep(0.05)
            grown = len(results)
            while len(results) < grown + 50:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        statuses = Counter(s for s, _ in results)
        assert statuses == {200: len(results)}, (statuses, Counter(v for s, v in results if s != 200))
        assert {v for _, v in results} == {"1", "2"} and len(results) > 100
    finally:
        server.should_exit = True
        thread.join(10)


def test_open_inference_protocol_matches_v1(stack: tuple[LiveApi, Client, TestClient, str]) -> None:
    import httpx

    api, _client, inference, project = stack
    name = f"oip-{project}"
    httpx.post(
        f"{api.url}/api/v1/projects/{project}/deployments",
        json={"name": name, "model_name": "iris", "target": 1},
        headers=api.headers,
    )
    wait_served(inference, name, {"1"})
    rows = pd.read_csv(IRIS).drop(columns=["target"]).sample(12, random_state=1)
    v1 = predict(inference, name, api.key, rows.to_dict(orient="records")).json()  # type: ignore[attr-defined]
    body = {
        "id": "req-1",
        "inputs": [
            {"name": c, "shape": [len(rows)], "datatype": "FP64", "data": rows[c].tolist()} for c in rows.columns
        ],
    }
    v2 = inference.post(f"/v2/models/{name}/infer", json=body, headers=api.headers).json()
    assert v2["outputs"][0]["data"] == v1["predictions"] and v2["model_version"] == "1" and v2["id"] == "req-1"
    assert inference.get("/v2/health/ready").json() == {"ready": True}
    meta = inference.get(f"/v2/models/{name}", headers=api.headers).json()
    assert [i["name"] for i in meta["inputs"]] == list(rows.columns)
    assert_problem(inference.post(f"/v2/models/{name}/infer", json={"inputs": "x"}, headers=api.headers), 422, "inputs")


def test_cli_and_sdk_for_models_deployments_and_predict(
    stack: tuple[LiveApi, Client, TestClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import uvicorn
    from typer.testing import CliRunner

    from miniml.cli import context
    from miniml.cli.main import app

    api, client, _inf, project = stack
    monkeypatch.setenv("MINIML_URL", api.url)
    monkeypatch.setenv("MINIML_API_KEY", api.key)
    monkeypatch.setenv("MINIML_INFERENCE_URL", api.settings.inference_url)
    monkeypatch.setattr(context.console, "width", 250)
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["models", "list", project, "--json"]).output)
    assert [m["name"] for m in listed] == ["iris"]
    versions = json.loads(runner.invoke(app, ["models", "versions", project, "iris", "--json"]).output)
    assert [v["version"] for v in versions] == ["1", "2"]
    promoted = runner.invoke(app, ["models", "promote", project, "iris", "1", "--stage", "staging", "--json"])
    assert json.loads(promoted.output)["aliases"] == ["staging"]
    assert "test_f1_macro" in runner.invoke(app, ["models", "compare", project, "iris", "1", "2"]).output
    asked = runner.invoke(app, ["models", "approval", project, "iris", "2", "request", "--note", "try it"])
    assert asked.exit_code == 0 and "v2: pending" in asked.output, asked.output
    no_note = runner.invoke(app, ["models", "approval", project, "iris", "2", "reject"])
    assert no_note.exit_code != 0 and "--note" in no_note.output
    rejected = runner.invoke(
        app, ["models", "approval", project, "iris", "2", "reject", "--note", "constant", "--json"]
    )
    assert json.loads(rejected.output)["approval"]["decision_note"] == "constant"
    name = f"cli-{project}"
    created = runner.invoke(app, ["deployments", "create", project, name, "iris", "--target", "staging", "--json"])
    assert created.exit_code == 0, created.output
    updated = runner.invoke(app, ["deployments", "update", project, name, "--target", "2"])
    assert updated.exit_code == 0, updated.output
    rolled_out = runner.invoke(app, ["deployments", "rollback", project, name, "--json"])
    assert rolled_out.exit_code == 0, rolled_out.output
    rolled = json.loads(rolled_out.output)
    assert rolled["target"] == {"kind": "alias", "alias": "staging"}
    assert client.deployments.get(project, name).desired[0].version == "1"
    assert [e.action for e in client.deployments.history(project, name)] == ["create", "update", "rollback"]
    server = uvicorn.Server(
        uvicorn.Config(
            create_inference_app(api.settings), host="127.0.0.1", port=api.settings.inference.port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        while True:
            out = runner.invoke(app, ["predict", name, "--rows", json.dumps([ROW])])
            if out.exit_code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert out.exit_code == 0, out.output
        assert json.loads(out.output)["predictions"] == ["Iris-setosa"], out.output
        sdk = Client(api.url, api_key=api.key, inference_url=api.settings.inference_url)
        assert sdk.predict(name, [ROW], probabilities=True)["probabilities"][0]["Iris-setosa"] > 0.5
        bad = runner.invoke(app, ["predict", name, "--rows", json.dumps([{"sepal_length": 1}])])
        assert bad.exit_code == 1 and "missing" in bad.output
    finally:
        server.should_exit = True
        thread.join(10)
    client.deployments.delete(project, name)
    assert client.deployments.list(project) == []


def test_capture_keeps_a_bounded_sample_and_never_fails_requests(
    stack: tuple[LiveApi, Client, TestClient, str],
) -> None:
    import json

    import httpx

    api, _client, _inf, project = stack
    name = f"cap-{project}"
    httpx.post(
        f"{api.url}/api/v1/projects/{project}/deployments",
        json={"name": name, "model_name": "iris", "target": 1},
        headers=api.headers,
    )
    settings = api.settings.model_copy(
        update={"inference": api.settings.inference.model_copy(update={"capture_buffer_rows": 25})}
    )
    with TestClient(create_inference_app(settings)) as inference:
        wait_served(inference, name, {"1"})
        rows = pd.read_csv(IRIS).drop(columns=["target"]).head(10).to_dict(orient="records")
        answers = [predict(inference, name, api.key, rows) for _ in range(4)]  # 40 rows: 20 kept, 20 dropped
        assert all(a.status_code == 200 for a in answers)  # type: ignore[attr-defined]
        keys = inference.app.state.capture.flush()  # type: ignore[attr-defined]
        assert len(keys) == 1 and keys[0].startswith(f"capture/{project}/{name}/")
        lines = b"".join(api.app.state.store.iter_bytes(keys[0])).decode().splitlines()
        records = [json.loads(line) for line in lines]
        # One line for the flush (one model version): the two kept requests' rows, in order.
        assert len(records) == 1 and len(records[0]["predictions"]) == 20
        assert all(len(v) == 20 for v in records[0]["columns"].values())
        for i in (0, 9, 10, 19):
            row = {c: v[i] for c, v in records[0]["columns"].items()}
            assert row == rows[i % 10]
        kept = answers[0].json()["predictions"] + answers[1].json()["predictions"]  # type: ignore[attr-defined]
        assert records[0]["predictions"] == kept
        metrics = inference.get("/metrics").text
        assert f'miniml_inference_capture_dropped_total{{deployment="{name}"}} 20.0' in metrics
        assert inference.app.state.capture.flush() == []  # type: ignore[attr-defined]


def test_readiness_and_a_failed_load_keeps_the_old_version(
    stack: tuple[LiveApi, Client, TestClient, str], mlflow_uri: str
) -> None:
    import asyncio

    from miniml.inference.state import State
    from miniml.monitoring.metrics import InferenceMetrics

    api, _client, _inf, project = stack
    key = signing_key(None, api.settings.data_dir)
    state = State(tracking_uri=mlflow_uri, max_batch_rows=64, metrics=InferenceMetrics(), signing_key=key)
    assert state.ready is False
    good = [
        {
            "project": project,
            "name": "r",
            "registered_name": f"{project}.iris",
            "variants": [{"version": "1", "weight": 100}],
        }
    ]
    bad = [{**good[0], "variants": [{"version": "99", "weight": 100}]}]

    async def run() -> None:
        await state.apply(good)
        assert state.ready and [v.version for v in state.served["r"].variants] == ["1"]
        await state.apply(bad)
        # The broken version never replaces the working one; the error is reported.
        assert [v.version for v in state.served["r"].variants] == ["1"]
        assert "99" in state.report()["r"]["error"] and state.report()["r"]["ready"] is False

    asyncio.run(run())


def test_inference_process_stops_cleanly_on_sigterm(
    stack: tuple[LiveApi, Client, TestClient, str], mlflow_uri: str
) -> None:
    import os
    import signal
    import subprocess
    import sys

    import httpx

    api, _client, _inf, project = stack
    name = f"term-{project}"
    httpx.post(
        f"{api.url}/api/v1/projects/{project}/deployments",
        json={"name": name, "model_name": "iris", "target": 1},
        headers=api.headers,
    )
    port = free_port()
    env = dict(os.environ) | {
        "MINIML_DATA_DIR": str(api.settings.data_dir),
        "MINIML_API__PORT": str(api.settings.api.port),
        "MINIML_MLFLOW__TRACKING_URI": mlflow_uri,
        "MINIML_INFERENCE__PORT": str(port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "miniml", "inference"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        ok = httpx.post(
            f"http://127.0.0.1:{port}/v1/endpoints/{name}/predict", json={"rows": [ROW]}, headers=api.headers
        )
        assert ok.json()["predictions"] == ["Iris-setosa"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=40)
    assert proc.returncode == 0, out


def test_shadow_never_changes_answers_and_reports_agreement(stack: tuple[LiveApi, Client, TestClient, str]) -> None:
    import httpx

    api, _client, inference, project = stack
    name = f"sh-{project}"
    body = {"name": name, "model_name": "iris", "target": 1, "shadow": {"version": 2, "fraction": 1.0}}
    created = httpx.post(f"{api.url}/api/v1/projects/{project}/deployments", json=body, headers=api.headers)
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + 20
    while inference.app.state.state.served.get(name) is None or inference.app.state.state.served[name].shadow is None:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    rows = pd.read_csv(IRIS).drop(columns=["target"]).sample(30, random_state=3).to_dict(orient="records")
    expected = [predict(inference, name, api.key, [r]).json() for r in rows]  # type: ignore[attr-defined]
    # The live answers come from version 1 only (the shadow, version 2, always says virginica).
    assert all(e["model_version"] == "1" for e in expected)
    live_only = pd.read_csv(IRIS).drop(columns=["target"])
    assert [e["predictions"][0] for e in expected] != ["Iris-virginica"] * 30
    deadline = time.monotonic() + 20
    while True:
        inference.post("/admin/reconcile", headers=api.headers)
        report = api_get(api, f"/api/v1/projects/{project}/deployments/{name}/shadow")
        if report["rows"] >= 30 or time.monotonic() > deadline:  # type: ignore[index]
            break
        time.sleep(0.3)
    records = report["records"]  # type: ignore[index]
    assert report["shadow_version"] == "2" and report["rows"] == 30 == len(records)  # type: ignore[index]
    assert [r["live"] for r in records] == [e["predictions"][0] for e in expected]
    assert all(r["shadow"] == "Iris-virginica" for r in records)
    computed = sum(r["live"] == r["shadow"] for r in records) / len(records)
    assert report["agreement"] == pytest.approx(computed)  # type: ignore[index]
    assert report["live_latency_ms"] > 0 and report["shadow_latency_ms"] > 0  # type: ignore[index]
    assert len(live_only) == 150


def test_batch_prediction_writes_a_new_dataset_version(stack: tuple[LiveApi, Client, TestClient, str]) -> None:
    import io

    import httpx

    from miniml.orchestration.runner import run_job

    api, client, inference, project = stack
    name = f"batch-{project}"
    httpx.post(
        f"{api.url}/api/v1/projects/{project}/deployments",
        json={"name": name, "model_name": "iris", "target": 1},
        headers=api.headers,
    )
    client.datasets.upload(project, IRIS)
    bad_csv = Path(api.settings.data_dir) / "partial.csv"
    bad_csv.write_text("sepal_length,sepal_width\n1,2\n3,4\n")
    client.datasets.upload(project, bad_csv)
    url = f"{api.url}/api/v1/projects/{project}/deployments/{name}/batch"
    assert_problem(httpx.post(url, json={"dataset": "partial"}, headers=api.headers), 422, "petal_length")
    assert_problem(httpx.post(url, json={"dataset": "nope"}, headers=api.headers), 422, "nope")
    assert_problem(
        httpx.post(
            f"{api.url}/api/v1/projects/{project}/deployments/ghost/batch",
            json={"dataset": "iris"},
            headers=api.headers,
        ),
        404,
        "ghost",
    )
    queued = httpx.post(url, json={"dataset": "iris"}, headers=api.headers)
    assert queued.status_code == 202 and queued.json()["kind"] == "batch" and queued.json()["state"] == "queued"
    done = run_job(api.worker_client(), api.settings, queued.json()["id"], project)
    assert done is not None and done.state == "succeeded", done
    assert done.output is not None and done.output["rows"] == 150 and done.output["dataset"] == "iris-predictions"
    written = client.datasets.version(project, "iris-predictions", 1)
    assert [c.name for c in written.columns][-1] == "prediction" and written.rows == 150
    out = pd.read_csv(
        io.BytesIO(b"".join(api.app.state.store.iter_bytes(api.app.state.store.key_for_uri(written.uri))))
    )
    wait_served(inference, name, {"1"})
    first = out.drop(columns=["target", "prediction"]).head(5).to_dict(orient="records")
    assert predict(inference, name, api.key, first).json()["predictions"] == out["prediction"].head(5).tolist()  # type: ignore[attr-defined]


def test_a_batch_cancelled_while_it_runs_stops_within_a_record_batch_and_writes_nothing(
    stack: tuple[LiveApi, Client, TestClient, str],
) -> None:
    """The cancel is sent as the first record batch is reported (a worker's log call that cancels
    makes the timing exact): the job ends cancelled after that batch, with no dataset written.
    (Before, a running batch ignored the cancel and wrote its predictions.)"""
    import httpx

    from miniml.orchestration.runner import run_job

    api, client, _inference, project = stack
    name = f"cancel-{project}"
    client.deployments.create(project, name, "iris", target=1)
    big = Path(api.settings.data_dir) / "many.csv"
    pd.concat([pd.read_csv(IRIS)] * 400).to_csv(big, index=False)  # 60,000 rows, several record batches
    client.datasets.upload(project, big)
    queued = httpx.post(
        f"{api.url}/api/v1/projects/{project}/deployments/{name}/batch", json={"dataset": "many"}, headers=api.headers
    ).json()
    worker = api.worker_client()
    real_log = worker.job_reports.log
    sent: list[int] = []

    def log_and_cancel(project_: str, job_id: int, message: str, **kwargs: object) -> None:
        real_log(project_, job_id, message, **kwargs)  # type: ignore[arg-type]
        if message.endswith("rows predicted") and not sent:
            sent.append(
                httpx.post(f"{api.url}/api/v1/projects/{project}/jobs/{job_id}/cancel", headers=api.headers).status_code
            )

    worker.job_reports.log = log_and_cancel  # type: ignore[method-assign]
    done = run_job(worker, api.settings, queued["id"], project)
    assert sent == [200]
    assert done is not None and done.state == "cancelled" and done.output is None, done
    stopped = [
        line.message for line in client.jobs.logs(project, queued["id"]) if "cancel: stopped after" in line.message
    ]
    assert len(stopped) == 1 and int(stopped[0].split()[3]) < 60_000, stopped
    assert "many-predictions" not in {d.name for d in client.datasets.list(project)}


def test_an_api_outage_is_logged_once_and_its_end_too(tmp_path: Path) -> None:
    """While the api is down a replica keeps serving; one warning, not one per reconcile."""
    import logging

    settings = Settings(
        data_dir=tmp_path / "d",
        api={"port": free_port()},
        prefect={"port": free_port()},
        mlflow={"port": free_port()},
        inference={"port": free_port(), "reconcile_s": 0.05, "key_cache_s": 0},
    )
    with LiveApi(settings):
        pass  # writes the admin key the replica uses, then the api is gone
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("miniml.inference")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    api = LiveApi(settings)
    try:
        with TestClient(create_inference_app(settings)) as inference:
            time.sleep(1.5)  # about 30 reconciles against a closed port
            assert inference.get("/healthz").status_code == 200
            api.__enter__()  # back, while the replica still runs (and stops before the api does)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(r.getMessage() == "reconcile works again" for r in records):
                time.sleep(0.1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        if api.thread.is_alive():
            api.__exit__(None, None, None)
    failed = [r for r in records if r.getMessage().startswith("reconcile failed")]
    recovered = [r for r in records if r.getMessage() == "reconcile works again"]
    assert len(failed) == 1, [r.getMessage() for r in records]
    assert len(recovered) == 1 and recovered[0].failures > 10  # type: ignore[attr-defined]
