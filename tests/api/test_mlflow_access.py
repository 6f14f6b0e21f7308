"""MLflow behind credentials: anonymous callers get nothing, each key signs in to MLflow with its
own id and key and reads only its projects' experiments and models (writes are the platform's);
a revoked key is shut out of MLflow at once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from miniml.config import Settings
from tests.conftest import LiveApi, free_port


def until(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_mlflow_shows_each_key_only_its_projects(tmp_path: Path, mlflow_uri: str) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        api={"port": free_port()},
        prefect={"port": free_port()},
        mlflow={"tracking_uri": mlflow_uri},
        jobs={"mlflow_sync_s": 0.5, "loop_interval_s": 0.2},
    )
    admin = MlflowClient(mlflow_uri)  # the platform's own account (the session's admin)
    with LiveApi(settings) as api:
        for name in ("mine", "theirs"):
            httpx.post(f"{api.url}/api/v1/projects", json={"name": name}, headers=api.headers).raise_for_status()
        # A model registered later in each project (as a worker would) is granted on the next sync.
        for project in ("mine", "theirs"):
            exp = admin.get_experiment_by_name(f"miniml/{project}")
            exp_id = exp.experiment_id if exp else admin.create_experiment(f"miniml/{project}")
            admin.create_run(exp_id)
            admin.create_registered_model(f"{project}.m-{tmp_path.name[-8:]}")

        def key(role: str, *projects: str) -> tuple[str, str]:
            made = httpx.post(
                f"{api.url}/api/v1/keys", json={"role": role, "projects": list(projects)}, headers=api.headers
            ).json()
            return made["id"], made["key"]

        viewer_id, viewer = key("viewer", "mine")
        engineer_id, engineer = key("engineer", "mine")
        model = f"mine.m-{tmp_path.name[-8:]}"
        other = f"theirs.m-{tmp_path.name[-8:]}"

        def as_user(user: str, password: str) -> httpx.Client:
            return httpx.Client(base_url=mlflow_uri, auth=(user, password), timeout=10)

        # Anonymous: nothing, UI included.
        assert httpx.get(f"{mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=10").status_code == 401
        assert httpx.get(f"{mlflow_uri}/").status_code == 401
        # The viewer sees its project's experiment and model, and nothing of the other project.
        v = as_user(viewer_id, viewer)
        until(lambda: v.get("/api/2.0/mlflow/registered-models/get", params={"name": model}).status_code == 200)
        names = {
            e["name"]
            for e in v.get("/api/2.0/mlflow/experiments/search", params={"max_results": 100}).json()["experiments"]
        }
        assert names == {"miniml/mine"}
        assert v.get("/api/2.0/mlflow/registered-models/get", params={"name": other}).status_code == 403
        found = v.get("/api/2.0/mlflow/registered-models/search", params={"max_results": 100}).json()
        assert {m["name"] for m in found.get("registered_models", [])} == {model}
        mine = admin.get_experiment_by_name("miniml/mine").experiment_id  # type: ignore[union-attr]
        theirs = admin.get_experiment_by_name("miniml/theirs").experiment_id  # type: ignore[union-attr]
        # People read MLflow; only the platform writes it: no run, no artifact, no alias from a key,
        # not even an engineer's in its own project (a file put into a model's artifacts before
        # a worker signs them would be signed with them).
        e = as_user(engineer_id, engineer)
        until(lambda: e.get("/api/2.0/mlflow/registered-models/get", params={"name": model}).status_code == 200)
        for user in (v, e):
            assert user.post("/api/2.0/mlflow/runs/create", json={"experiment_id": mine}).status_code == 403
            assert user.post("/api/2.0/mlflow/runs/create", json={"experiment_id": theirs}).status_code == 403
            alias = {"name": model, "alias": "production", "version": "1"}
            assert user.post("/api/2.0/mlflow/registered-models/alias", json=alias).status_code == 403
            put = user.put(f"/api/2.0/mlflow-artifacts/artifacts/{mine}/x/evil.txt", content=b"x")
            assert put.status_code == 403
        # A model the project registers after the key was made is granted by the periodic sync.
        later = f"mine.later-{tmp_path.name[-8:]}"
        admin.create_registered_model(later)
        until(lambda: v.get("/api/2.0/mlflow/registered-models/get", params={"name": later}).status_code == 200)
        # A name taken ahead of the platform (MLflow lets any user create, and makes the creator its
        # manager) does not stay in its taker's hands: the next sync takes the grant back.
        squat = v.post("/api/2.0/mlflow/experiments/create", json={"name": f"miniml/future-{tmp_path.name[-8:]}"})
        if squat.status_code == 200:
            exp_id = squat.json()["experiment_id"]
            until(lambda: v.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": exp_id}).status_code == 403)
        # A wrong password, or a key of another id, is refused.
        assert as_user(viewer_id, engineer).get("/api/2.0/mlflow/users/current").status_code == 401
        # Revoked: shut out of MLflow at once.
        assert httpx.delete(f"{api.url}/api/v1/keys/{viewer_id}", headers=api.headers).status_code == 200
        until(lambda: v.get("/api/2.0/mlflow/users/current").status_code == 401, timeout=5)


def test_the_grant_sync_looks_up_experiments_again_after_a_project_was_deleted(mlflow_uri: str) -> None:
    """A deleted project's experiment is retired (renamed, deleted); the same name, made again, is a
    new experiment. The sync must grant that one, not the id it remembered for the name (which would
    give a new project's keys the deleted project's runs)."""
    from miniml.tracking.access import ADMIN_USERNAME, MlflowAccess
    from miniml.tracking.registry import Registry
    from tests.conftest import MLFLOW_ADMIN_PASSWORD

    project = f"gone-{uuid.uuid4().hex[:8]}"
    access = MlflowAccess(mlflow_uri, ADMIN_USERNAME, MLFLOW_ADMIN_PASSWORD)
    old = access.experiment_id(f"miniml/{project}")
    Registry(mlflow_uri).forget_project(project)
    access.apply([], gone=set())  # a sync round, in this api process or another
    new = access.experiment_id(f"miniml/{project}")
    assert new != old and MlflowClient(mlflow_uri).get_experiment(new).lifecycle_stage == "active"


@pytest.mark.parametrize("path", ["/api/2.0/mlflow/runs/search", "/api/2.0/mlflow/registered-models/search"])
def test_anonymous_mlflow_calls_are_refused(mlflow_uri: str, path: str) -> None:
    response = httpx.get(f"{mlflow_uri}{path}")
    assert response.status_code == 401 and "Basic" in response.headers.get("www-authenticate", "")
