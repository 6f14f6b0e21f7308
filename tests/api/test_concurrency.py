"""Parallel creates through the live api, on SQLite and PostgreSQL: distinct things are all made;
one unique name is made once and every other request gets a 409 that names it. Never a 500,
never a silent loss. (Parallel dataset uploads: tests/api/test_datasets.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd
import pytest
import skops.io as sio
from sklearn.linear_model import LogisticRegression
from sqlalchemy import select

from miniml.config import Settings
from miniml.db import tables
from miniml.tracking.runs import Tracker
from tests.conftest import LiveApi, assert_problem, free_port
from tests.inference.test_serving import register

N = 20
IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"


def burst(send: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """N requests at once, one per thread."""
    with ThreadPoolExecutor(N) as pool:
        return list(pool.map(send, range(N)))


def statuses(answers: list[httpx.Response]) -> list[int]:
    return sorted(a.status_code for a in answers)


def errors(answers: list[httpx.Response]) -> list[str]:
    return [a.text for a in answers if a.status_code >= 500]


def live_settings(tmp_path: Path, db_url: str, **extra: object) -> Settings:
    mlflow = extra.pop("mlflow", {"port": free_port(), "auth": False})
    return Settings(
        data_dir=tmp_path / "data",
        api={"port": free_port()},
        db={"url": db_url},
        mlflow=mlflow,
        prefect={"port": free_port()},  # nothing listens: jobs stay queued
        **extra,
    )


@pytest.fixture
def api(tmp_path: Path, db_url: str) -> Iterator[LiveApi]:
    with LiveApi(live_settings(tmp_path, db_url)) as live:
        yield live


@pytest.fixture
def iris(api: LiveApi) -> str:
    """Project 'demo' with dataset 'iris' v1; returns the project's base URL."""
    base = f"{api.url}/api/v1/projects"
    httpx.post(base, json={"name": "demo"}, headers=api.headers).raise_for_status()
    files = {"file": ("iris.csv", IRIS.read_bytes())}
    httpx.post(f"{base}/demo/datasets", files=files, headers=api.headers, timeout=60).raise_for_status()
    return f"{base}/demo"


def test_parallel_projects_distinct_are_all_made_one_name_once(api: LiveApi) -> None:
    url = f"{api.url}/api/v1/projects"
    distinct = burst(lambda i: httpx.post(url, json={"name": f"p{i}"}, headers=api.headers, timeout=30))
    assert statuses(distinct) == [201] * N, errors(distinct)
    same = burst(lambda _: httpx.post(url, json={"name": "race"}, headers=api.headers, timeout=30))
    assert statuses(same) == [201] + [409] * (N - 1), errors(same)
    for answer in same:
        if answer.status_code == 409:
            assert_problem(answer, 409, "Project 'race' already exists", "another name")
    listed = httpx.get(url, headers=api.headers).json()
    assert sorted(p["name"] for p in listed) == sorted([f"p{i}" for i in range(N)] + ["race"])


def test_parallel_keys_are_all_made(api: LiveApi) -> None:
    httpx.post(f"{api.url}/api/v1/projects", json={"name": "demo"}, headers=api.headers).raise_for_status()
    url = f"{api.url}/api/v1/keys"
    body = {"role": "engineer", "projects": ["demo"]}
    answers = burst(lambda _: httpx.post(url, json=body, headers=api.headers, timeout=30))
    assert statuses(answers) == [201] * N, errors(answers)
    made = {a.json()["id"] for a in answers}
    assert len(made) == N
    assert made <= {k["id"] for k in httpx.get(url, headers=api.headers).json()}
    for answer in answers[:3]:  # each works, and sees its project
        key = {"X-API-Key": answer.json()["key"]}
        assert [p["name"] for p in httpx.get(f"{api.url}/api/v1/projects", headers=key).json()] == ["demo"]


def test_parallel_jobs_are_all_made_one_idempotency_key_once(api: LiveApi, iris: str) -> None:
    body = {"dataset": "iris", "target": "target", "max_trials": 1}
    distinct = burst(lambda _: httpx.post(f"{iris}/jobs", json=body, headers=api.headers, timeout=30))
    assert statuses(distinct) == [202] * N, errors(distinct)
    assert len({a.json()["id"] for a in distinct}) == N
    headers = {**api.headers, "Idempotency-Key": "burst-1"}
    same = burst(lambda _: httpx.post(f"{iris}/jobs", json=body, headers=headers, timeout=30))
    assert statuses(same) == [200] * (N - 1) + [202], errors(same)
    assert len({a.json()["id"] for a in same}) == 1
    assert len(httpx.get(f"{iris}/jobs", headers=api.headers).json()) == N + 1


def test_parallel_imports_of_one_model_name_are_all_queued(api: LiveApi, iris: str) -> None:
    """Each import is its own job; the versions are numbered when a worker registers them."""
    frame = pd.read_csv(IRIS)
    model = sio.dumps(LogisticRegression(max_iter=500).fit(frame.drop(columns=["target"]), frame["target"]))

    def send(_: int) -> httpx.Response:
        return httpx.post(
            f"{iris}/models/outside/versions",
            params={"dataset": "iris", "target": "target"},
            files={"file": ("model.skops", model)},
            headers=api.headers,
            timeout=60,
        )

    answers = burst(send)
    assert statuses(answers) == [202] * N, errors(answers)
    assert len({a.json()["id"] for a in answers}) == N
    assert len([k for k in api.app.state.store.list_keys("projects/") if "/imports/" in k]) == N


def test_parallel_deployments_and_feedback(tmp_path: Path, db_url: str, mlflow_uri: str) -> None:
    """Deployment names: distinct all made, one name once. Labels for one prediction sent at once: the
    last one stored wins, no request fails."""
    project = f"c{uuid.uuid4().hex[:8]}"  # the session's MLflow is shared: a project of our own
    settings = live_settings(tmp_path, db_url, mlflow={"tracking_uri": mlflow_uri})
    with LiveApi(settings) as api:
        httpx.post(f"{api.url}/api/v1/projects", json={"name": project}, headers=api.headers).raise_for_status()
        register(Tracker(mlflow_uri), project, "iris", LogisticRegression(max_iter=500), settings=settings)
        url = f"{api.url}/api/v1/projects/{project}/deployments"

        def create(name: str) -> httpx.Response:
            body = {"name": name, "model_name": "iris", "target": 1}
            return httpx.post(url, json=body, headers=api.headers, timeout=60)

        distinct = burst(lambda i: create(f"{project}-{i}"))
        assert statuses(distinct) == [201] * N, errors(distinct)
        same = burst(lambda _: create(f"{project}-race"))
        assert statuses(same) == [201] + [409] * (N - 1), errors(same)
        for answer in same:
            if answer.status_code == 409:
                assert_problem(answer, 409, f"'{project}-race' already exists", "pick another")
        listed = httpx.get(url, headers=api.headers).json()
        assert len(listed) == N + 1

        inference = {"X-API-Key": api.inference_key}
        at = datetime.now(UTC).isoformat()

        def label(i: int) -> httpx.Response:
            record = {
                "deployment": f"{project}-race",
                "prediction_id": "one",
                "version": "1",
                "predicted": "setosa",
                "label": f"label-{i}",
                "predicted_at": at,
            }
            return httpx.post(f"{api.url}/api/v1/inference/feedback", json=[record], headers=inference, timeout=30)

        labels = burst(label)
        assert statuses(labels) == [200] * N, [a.text for a in labels if a.status_code != 200]
        with api.app.state.db.begin() as session:
            rows = list(session.scalars(select(tables.Feedback)))
        assert len(rows) == 1 and rows[0].label in {f"label-{i}" for i in range(N)}
