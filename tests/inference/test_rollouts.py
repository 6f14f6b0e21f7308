"""Safe rollouts: a version is checked before it takes traffic. Refused (incompatible columns),
failing to load, or failing its smoke prediction, it never answers a request: the old version keeps
serving, the deployment says rollout_failed with the reason, and the history and audit log have it."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
from fastapi.testclient import TestClient
from mlflow.models import infer_signature
from sklearn.linear_model import LogisticRegression

from miniml.sdk.client import Client
from miniml.tracking.runs import Tracker
from miniml.tracking.signing import sign_version, signing_key
from miniml.training.data import features_from_profile
from miniml.training.families import FAMILIES
from miniml.training.search import build_pipeline
from tests.conftest import LiveApi
from tests.inference.test_provenance import _register_pickle
from tests.inference.test_serving import IRIS, ROW, stack, wait_served

__all__ = ["stack"]


def _register_wider(api: LiveApi, project: str) -> str:
    """A signed version that needs a column the live ones do not take ('petal_ratio')."""
    frame = pd.read_csv(IRIS)
    frame["petal_ratio"] = frame["petal_length"] / frame["petal_width"]
    columns = [c for c in frame.columns if c != "target"]
    profile = {
        "columns": [{"name": c, "kind": "numeric"} for c in columns] + [{"name": "target", "kind": "categorical"}]
    }
    features = features_from_profile(profile, "target")
    pipe = build_pipeline(features, FAMILIES["linear"], LogisticRegression(max_iter=500))
    pipe.fit(frame[features.columns], frame["target"])
    tracker = Tracker(api.settings.mlflow_uri)
    run = tracker.start_job_run(project, 9, {"miniml.dataset": "iris", "miniml.dataset_version": "1"})
    return tracker.log_model(
        run,
        pipe,
        FAMILIES["linear"],
        frame[features.columns].head(3),
        registered=f"{project}.iris",
        params={"family": "linear"},
        metrics={"f1_macro": 0.9},
        signing_key=signing_key(None, api.settings.data_dir),
    )


def _register_broken(api: LiveApi, project: str) -> str:
    """A signed version with the live columns whose model cannot predict them (fitted on 3 of the 4)."""
    frame = pd.read_csv(IRIS)
    columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    model = LogisticRegression(max_iter=500).fit(frame[columns[:3]].to_numpy(), frame["target"])
    example = frame[columns].head(3)
    mlflow.set_tracking_uri(api.settings.mlflow_uri)
    registered = f"{project}.iris"
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=infer_signature(example, np.array(["x"] * 3)),
            input_example=example,
            serialization_format="skops",
            skops_trusted_types=list(FAMILIES["linear"].trusted_types) or None,
            registered_model_name=registered,
        )
    version = str(info.registered_model_version)
    sign_version(api.settings.mlflow_uri, registered, version, signing_key(None, api.settings.data_dir))
    return version


@contextmanager
def _steady_load(
    inference: TestClient, name: str, key: str, row: dict[str, float] = ROW
) -> Iterator[list[tuple[int, str]]]:
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            r = inference.post(f"/v1/endpoints/{name}/predict", json={"rows": [row]}, headers={"X-API-Key": key})
            results.append((r.status_code, r.headers.get("x-model-version", "")))
            time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield results
    finally:
        stop.set()
        thread.join(30)


def _dep(api: LiveApi, project: str, name: str) -> dict[str, object]:
    r = httpx.get(f"{api.url}/api/v1/projects/{project}/deployments/{name}", headers=api.headers)
    return r.json()  # type: ignore[no-any-return]


def _until_state(api: LiveApi, project: str, name: str, state: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dep = _dep(api, project, name)
        if dep["state"] == state:
            return dep
        time.sleep(0.2)
    raise AssertionError(f"{name} never reached {state}: {dep}")


def _history(api: LiveApi, project: str, name: str) -> list[dict[str, object]]:
    url = f"{api.url}/api/v1/projects/{project}/deployments/{name}/history"
    return httpx.get(url, headers=api.headers).json()  # type: ignore[no-any-return]


def test_an_incompatible_version_is_refused_until_allowed(stack: tuple[LiveApi, Client, TestClient, str]) -> None:
    api, client, inference, project = stack
    client.deployments.create(project, "wide", "iris", target=1)
    wait_served(inference, "wide", {"1"})
    wider = _register_wider(api, project)
    url = f"{api.url}/api/v1/projects/{project}/deployments/wide"
    # These callers already send the new column (version 1 ignores it): allowing the change is safe for them.
    with _steady_load(inference, "wide", api.key, ROW | {"petal_ratio": 3.5}) as results:
        refused = httpx.patch(url, json={"target": int(wider)}, headers=api.headers)
        assert refused.status_code == 409, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        detail = refused.json()["detail"]
        assert "petal_ratio" in detail and "allow_schema_change" in detail and f"Version {wider}" in detail
        dep = _dep(api, project, "wide")
        assert dep["state"] == "rollout_failed" and "petal_ratio" in str(dep["rollout_error"])
        assert dep["target"] == {"kind": "version", "version": "1"}  # nothing switched
        assert [e["action"] for e in _history(api, project, "wide")][-1] == "rollout_refused"
        time.sleep(1.5)  # a few reconciles: the replica keeps version 1
        wait_served(inference, "wide", {"1"})
        audit = httpx.get(f"{api.url}/api/v1/audit", headers=api.headers, params={"limit": 20}).json()
        assert any(e["status"] == 409 and "wide" in e["target"] for e in audit), audit
        # The caller says the new column is sent now: the rollout goes through.
        allowed = httpx.patch(url, json={"target": int(wider), "allow_schema_change": True}, headers=api.headers)
        assert allowed.status_code == 200, allowed.text
        wait_served(inference, "wide", {wider})
        assert _until_state(api, project, "wide", "ready")["rollout_error"] is None
    assert Counter(s for s, _ in results) == {200: len(results)}, Counter(results)
    assert {v for _, v in results} == {"1", wider}


def test_a_version_that_fails_to_load_never_takes_traffic(
    stack: tuple[LiveApi, Client, TestClient, str], tmp_path: Path
) -> None:
    api, client, inference, project = stack
    client.deployments.create(project, "unloadable", "iris", target=1)
    wait_served(inference, "unloadable", {"1"})
    bad = _register_pickle(api.settings.mlflow_uri, f"{project}.iris", tmp_path / "marker")
    with _steady_load(inference, "unloadable", api.key) as results:
        url = f"{api.url}/api/v1/projects/{project}/deployments/unloadable"
        assert httpx.patch(url, json={"target": int(bad)}, headers=api.headers).status_code == 200
        dep = _until_state(api, project, "unloadable", "rollout_failed")
        assert f"version {bad} failed to load" in str(dep["rollout_error"])
        assert "no platform signature" in str(dep["rollout_error"])
        wait_served(inference, "unloadable", {"1"})
        events = _history(api, project, "unloadable")
        assert events[-1]["action"] == "rollout_failed" and "failed to load" in str(events[-1]["detail"])
    assert Counter(s for s, _ in results) == {200: len(results)}, Counter(results)
    assert {v for _, v in results} == {"1"} and len(results) > 10


def test_a_failing_smoke_prediction_is_rolled_back(stack: tuple[LiveApi, Client, TestClient, str]) -> None:
    api, client, inference, project = stack
    client.deployments.create(project, "smoke", "iris", target=1)
    wait_served(inference, "smoke", {"1"})
    broken = _register_broken(api, project)
    with _steady_load(inference, "smoke", api.key) as results:
        url = f"{api.url}/api/v1/projects/{project}/deployments/smoke"
        assert httpx.patch(url, json={"target": int(broken)}, headers=api.headers).status_code == 200
        dep = _until_state(api, project, "smoke", "rollout_failed")
        assert "smoke prediction" in str(dep["rollout_error"]) and f"version {broken}" in str(dep["rollout_error"])
        # An explicit version that was refused is rolled back automatically.
        deadline = time.monotonic() + 30
        while _dep(api, project, "smoke")["target"].get("version") != "1":  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, _dep(api, project, "smoke")
            time.sleep(0.2)
        actions = [(e["action"], e["key_id"]) for e in _history(api, project, "smoke")]
        assert actions[-2:] == [("rollout_failed", None), ("rollback", None)], actions
        wait_served(inference, "smoke", {"1"})
        time.sleep(1)
    assert Counter(s for s, _ in results) == {200: len(results)}, Counter(results)
    assert {v for _, v in results} == {"1"} and len(results) > 10
    # The old version still answers, and the deployment keeps saying why the rollout failed.
    assert _dep(api, project, "smoke")["state"] == "rollout_failed"
