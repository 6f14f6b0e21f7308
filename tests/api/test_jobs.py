"""Jobs API: submit-time validation, idempotency, the worker protocol, cancel, heartbeats."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from miniml.api.app import create_app
from miniml.config import Settings
from tests.conftest import assert_problem, free_port

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"
JOBS = "/api/v1/projects/demo/jobs"


@pytest.fixture
def jc(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with _jc(tmp_path) as made:
        yield made


@pytest.fixture(scope="module")
def shared_jc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """One app for the table of bad requests (each case checks it created nothing)."""
    with _jc(tmp_path_factory.mktemp("jobs")) as made:
        yield made


@contextlib.contextmanager
def _jc(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(
        data_dir=tmp_path / "d",
        prefect={"port": free_port()},
        mlflow={"port": free_port()},
        jobs={"heartbeat_timeout_s": 1.0, "loop_interval_s": 0.2},
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        admin = {"X-API-Key": (settings.data_dir / "admin.key").read_text().strip()}
        client.post("/api/v1/projects", json={"name": "demo"}, headers=admin)
        for name, content in (
            ("iris.csv", IRIS.read_bytes()),
            ("one.csv", b"x,y\n" + b"".join(f"{i},a\n".encode() for i in range(30))),
            ("tiny.csv", b"x,y\n1,a\n2,b\n3,a\n"),
            ("skew.csv", b"x,y\n" + b"".join(f"{i},a\n".encode() for i in range(30)) + b"31,b\n"),
            ("texty.csv", b"x,t\n" + b"".join(f"{i},word{i}\n".encode() for i in range(100))),
            ("flat.csv", b"x,y\n" + b"".join(f"{i},7\n".encode() for i in range(40))),
            ("ids.csv", b"x,y\n" + b"".join(f"{i % 3},{i}\n".encode() for i in range(40))),
        ):
            assert (
                client.post(
                    "/api/v1/projects/demo/datasets", files={"file": (name, content)}, headers=admin
                ).status_code
                == 201
            )
        yield client, admin


def worker_of(client: TestClient) -> dict[str, str]:
    """The worker service's key, as the api wrote it on start."""
    data_dir = client.app.state.settings.data_dir  # type: ignore[attr-defined]
    return {"X-API-Key": (data_dir / "worker.key").read_text().strip()}


def job_count(client: TestClient, admin: dict[str, str]) -> int:
    return len(client.get(JOBS, headers=admin).json())


def test_submit_answers_202_at_once_with_a_queued_job(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    start = time.monotonic()
    response = client.post(JOBS, json={"dataset": "iris", "target": "target", "max_trials": 3}, headers=admin)
    assert response.status_code == 202, response.text
    job = response.json()
    assert time.monotonic() - start < 10
    assert job["state"] == "queued" and job["spec"]["task"] == "classification" and job["spec"]["metric"] == "f1_macro"
    assert job["spec"]["families"] == [
        "linear",
        "random_forest",
        "extra_trees",
        "hist_gradient_boosting",
        "lightgbm",
        "xgboost",
        "torch_mlp",
    ]
    assert job["spec"]["promote_to"] == "staging" and job["spec"]["model_name"] == "iris"
    assert client.get(f"{JOBS}/{job['id']}", headers=admin).json()["state"] == "queued"
    logs = client.get(f"{JOBS}/{job['id']}/logs", headers=admin).json()
    assert logs and "queued" in logs[0]["message"]


def test_a_job_gets_a_time_budget_unless_it_names_one(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    for budget, expected in (
        ({}, (20, 60.0)),  # neither: 20 trials or a time that fits iris (the 60 s floor), whichever first
        ({"max_trials": 7}, (7, None)),  # a trial budget alone is kept as asked
        ({"timeout_s": 30}, (None, 30.0)),  # a time budget alone runs trials until it is spent
        ({"max_trials": 7, "timeout_s": 30}, (7, 30.0)),
    ):
        response = client.post(JOBS, json={"dataset": "iris", "target": "target"} | budget, headers=admin)
        assert response.status_code == 202, response.text
        spec = response.json()["spec"]
        assert (spec["max_trials"], spec["timeout_s"]) == expected, budget


def test_the_default_time_budget_grows_with_the_data() -> None:
    from miniml.services.jobs import default_timeout_s

    sizes = [(150, 5), (20_000, 50), (100_000, 50), (2_000_000, 7), (100_000_000, 100)]
    budgets = [default_timeout_s(rows, cols) for rows, cols in sizes]
    assert budgets == sorted(budgets) and budgets[0] == budgets[1] == 60  # a million cells or fewer: 60 s
    assert 60 < budgets[2] < budgets[3] < budgets[4] == 3600  # then more, up to an hour


def test_seed_train_route(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    uri = client.get("/api/v1/projects/demo/datasets/iris/versions/1", headers=admin).json()["s3_uri"]
    body = {
        "project": "demo",
        "dataset_s3_uri": uri,
        "target": "target",
        "model_name": "iris-clf",
        "test_size": 0.3,
        "max_trials": 4,
    }
    response = client.post("/experiments/train", json=body, headers=admin)
    assert response.status_code == 202
    assert response.json()["spec"]["model_name"] == "iris-clf" and response.json()["spec"]["max_trials"] == 4


@pytest.mark.parametrize(
    ("body", "needles"),
    [
        ({"dataset": "nope", "target": "target"}, ["nope", "upload it first"]),
        ({"dataset": "iris", "version": 9, "target": "target"}, ["no version 9"]),
        ({"dataset_uri": "file:///etc/passwd", "target": "target"}, ["not a dataset version of project"]),
        ({"dataset_uri": "http://169.254.169.254/latest/meta-data", "target": "target"}, ["not a dataset version"]),
        (
            {"dataset_uri": "s3://other-bucket/projects/1/datasets/1/x.csv", "target": "target"},
            ["not a dataset version"],
        ),
        ({"target": "target"}, ["name the training data"]),
        ({"dataset": "iris", "target": "species"}, ["species", "sepal_length"]),
        ({"dataset": "one", "target": "y"}, ["only one class"]),
        ({"dataset": "flat", "target": "y", "task": "regression"}, ["same value in every row"]),
        ({"dataset": "flat", "target": "y"}, ["only one class"]),
        ({"dataset": "ids", "target": "y", "task": "classification"}, ["40 classes in 40 rows", "regression"]),
        ({"dataset": "tiny", "target": "y"}, ["too few rows"]),
        ({"dataset": "skew", "target": "y"}, ["class 'b'", "only 1 rows"]),
        ({"dataset": "texty", "target": "t"}, ["text column"]),
        ({"dataset": "iris", "target": "target", "families": ["svm"]}, ["svm", "random_forest"]),
        ({"dataset": "iris", "target": "target", "families": []}, ["empty"]),
        ({"dataset": "iris", "target": "target", "metric": "auc_pr"}, ["auc_pr", "f1_macro"]),
        ({"dataset": "iris", "target": "target", "metric": "rmse"}, ["rmse", "is for regression"]),
        (
            {"dataset": "iris", "target": "petal_width", "task": "regression", "metric": "accuracy"},
            ["is for classification"],
        ),
        ({"dataset": "iris", "target": "target", "task": "regression"}, ["not numeric"]),
        ({"dataset": "iris", "target": "target", "max_trials": 0}, ["max_trials", "greater than or equal to 1"]),
        ({"dataset": "iris", "target": "target", "max_trials": 10**9}, ["max_trials", "less than or equal to 10000"]),
        ({"dataset": "iris", "target": "target", "max_trials": 10**30}, ["max_trials", "less than or equal to"]),
        ({"dataset": "iris", "target": "target", "seed": 10**30}, ["seed", "less than or equal to 4294967295"]),
        ({"dataset": "iris", "target": "target", "seed": -1}, ["seed", "greater than or equal to 0"]),
        ({"dataset": "iris", "version": 10**30, "target": "target"}, ["version", "less than or equal to 2147483647"]),
        ({"dataset": "iris", "target": "target", "parallelism": 10**6}, ["parallelism", "less than or equal to 32"]),
        ({"dataset": "iris", "target": "target", "timeout_s": 1e30}, ["timeout_s", "less than or equal to"]),
        (
            {"dataset": "iris", "target": "target", "reproducible": True, "parallelism": 2},
            ["reproducible", "parallelism is 2", "set parallelism to 1"],
        ),
        ({"dataset": "iris", "target": "target", "reproducible": "maybe"}, ["reproducible", "boolean"]),
        ({"dataset": "iris", "target": "target", "max_trials": -3}, ["max_trials"]),
        ({"dataset": "iris", "target": "target", "model_name": "../evil"}, ["not valid"]),
        ({"dataset": "iris", "target": "target", "cv_folds": 1}, ["cv_folds"]),
        ({"dataset": "iris", "target": "target", "state": "succeeded"}, ["state", "not a known field"]),
        ({"dataset": "iris", "target": "target", "resources": {"memory": "4GB"}}, ["memory", "pattern"]),
        ({"dataset": "iris", "target": "target", "resources": {"gpu": 9}}, ["gpu", "less than or equal to 8"]),
        ({"dataset": "iris", "target": "target", "resources": {"cpu": 0}}, ["cpu", "greater than 0"]),
        ({"dataset": "iris", "target": "target", "resources": {"tpu": 1}}, ["tpu", "not a known field"]),
    ],
)
def test_bad_job_requests_are_422_and_create_nothing(
    shared_jc: tuple[TestClient, dict[str, str]], body: dict[str, object], needles: list[str]
) -> None:
    client, admin = shared_jc
    assert_problem(client.post(JOBS, json=body, headers=admin), 422, *needles)
    assert job_count(client, admin) == 0


def test_foreign_project_uri_is_refused(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    client.post("/api/v1/projects", json={"name": "other"}, headers=admin)
    up = client.post("/api/v1/projects/other/datasets", files={"file": ("iris.csv", IRIS.read_bytes())}, headers=admin)
    body = {"dataset_uri": up.json()["uri"], "target": "target"}
    assert_problem(client.post(JOBS, json=body, headers=admin), 422, "not a dataset version of project 'demo'")
    assert job_count(client, admin) == 0


def test_production_promotion_needs_admin(
    jc: tuple[TestClient, dict[str, str]], make_key_for: Callable[..., dict[str, str]]
) -> None:
    client, admin = jc
    engineer = make_key_for(client, "engineer", "demo")
    body = {"dataset": "iris", "target": "target", "promote_to": "production"}
    assert_problem(client.post(JOBS, json=body, headers=engineer), 403, "admin")
    assert client.post(JOBS, json={**body, "promote_to": "staging"}, headers=engineer).status_code == 202
    assert client.post(JOBS, json=body, headers=admin).status_code == 202


def test_idempotency_key_replays_the_first_job(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    body = {"dataset": "iris", "target": "target", "max_trials": 2}
    headers = {**admin, "Idempotency-Key": "retry-123"}
    first = client.post(JOBS, json=body, headers=headers)
    again = client.post(JOBS, json=body, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert job_count(client, admin) == 1
    assert (
        client.post(JOBS, json=body, headers={**admin, "Idempotency-Key": "other"}).json()["id"] != first.json()["id"]
    )
    # The same body spelled otherwise (defaults written out, keys reordered) is the same request.
    spelled = {"max_trials": 2, "seed": 0, "target": "target", "dataset": "iris"}
    assert client.post(JOBS, json=spelled, headers=headers).json()["id"] == first.json()["id"]
    # Another body under the same key: 422 naming the key, no job made, the first one untouched.
    before = job_count(client, admin)
    other = client.post(JOBS, json={**body, "max_trials": 3}, headers=headers)
    assert_problem(other, 422, "retry-123", "another body")
    assert job_count(client, admin) == before


def test_concurrent_requests_with_one_key_make_one_job(jc: tuple[TestClient, dict[str, str]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client, admin = jc
    body = {"dataset": "iris", "target": "target", "max_trials": 2}
    headers = {**admin, "Idempotency-Key": "burst-1"}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: client.post(JOBS, json=body, headers=headers), range(6)))
    assert {a.status_code for a in answers} <= {200, 202}, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sorted(a.status_code for a in answers).count(202) == 1


def test_worker_protocol_and_state_machine(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    worker = worker_of(client)
    job = client.post(JOBS, json={"dataset": "iris", "target": "target", "max_trials": 3}, headers=admin).json()
    url = f"{JOBS}/{job['id']}"
    assert client.post(f"{url}/trials/claim", headers=worker).json() == {"granted": False}  # not running yet
    assert client.post(f"{url}/start", json={"worker": "w1"}, headers=worker).json()["state"] == "running"
    assert_problem(client.post(f"{url}/start", json={"worker": "w2"}, headers=worker), 409, "cannot be started again")
    grants = [client.post(f"{url}/trials/claim", headers=worker).json()["granted"] for _ in range(5)]
    assert grants == [True, True, True, False, False]
    for number, score in enumerate([0.8, 0.95, None]):
        report = {
            "number": number,
            "family": "linear",
            "params": {"linear.C": 1.0},
            "score": score,
            "duration_s": 0.1,
            "state": "complete" if score else "pruned",
            "worker": "w1",
        }
        client.post(f"{url}/trials", json=report, headers=worker)
    read = client.get(url, headers=admin).json()
    assert read["progress"]["trials_done"] == 3 and read["progress"]["best_score"] == 0.95
    assert [t["number"] for t in read["leaderboard"]] == [1, 0, 2]
    assert client.post(f"{url}/finalize", json={"worker": "w1"}, headers=worker).json()["granted"] is True
    assert client.post(f"{url}/finalize", json={"worker": "w2"}, headers=worker).json()["granted"] is False
    done = client.post(f"{url}/finish", json={"state": "succeeded", "test_metrics": {"f1_macro": 0.9}}, headers=worker)
    assert done.json()["state"] == "succeeded" and done.json()["finished_at"]
    assert_problem(
        client.post(f"{url}/finish", json={"state": "failed", "reason": "x"}, headers=worker), 409, "succeeded"
    )
    assert_problem(client.post(f"{url}/cancel", headers=admin), 409, "already succeeded")


def test_shards_of_a_parallel_job_start_in_any_order_and_once_each(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    worker = worker_of(client)
    body = {"dataset": "iris", "target": "target", "max_trials": 4, "parallelism": 2}
    url = f"{JOBS}/{client.post(JOBS, json=body, headers=admin).json()['id']}"
    # Shard 1's process happened to start first: it starts the job, and shard 0 still joins.
    assert client.post(f"{url}/start?shard=1", json={"worker": "w1"}, headers=worker).json()["state"] == "running"
    assert client.post(f"{url}/start?shard=0", json={"worker": "w0"}, headers=worker).json()["state"] == "running"
    assert_problem(client.post(f"{url}/start?shard=1", json={"worker": "w2"}, headers=worker), 409, "cannot be started")
    assert_problem(client.post(f"{url}/start?shard=2", json={"worker": "w2"}, headers=worker), 409, "no shard 2")
    read = client.get(url, headers=admin).json()
    assert read["worker"] == "w1" and read["state"] == "running"
    messages = [line["message"] for line in client.get(f"{url}/logs", headers=admin).json()]
    assert any("running on w1 (shard 1)" in m for m in messages) and any("shard 0 joined on w0" in m for m in messages)
    assert not any("w2" in m for m in messages)


def test_cancel_a_queued_job(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    worker = worker_of(client)
    job = client.post(JOBS, json={"dataset": "iris", "target": "target"}, headers=admin).json()
    cancelled = client.post(f"{JOBS}/{job['id']}/cancel", headers=admin).json()
    assert cancelled["state"] == "cancelled" and cancelled["cancel_requested"]
    assert_problem(client.post(f"{JOBS}/{job['id']}/start", json={"worker": "w"}, headers=worker), 409, "cancelled")


def test_cancel_a_running_job_is_seen_by_its_worker(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    worker = worker_of(client)
    job = client.post(JOBS, json={"dataset": "iris", "target": "target"}, headers=admin).json()
    url = f"{JOBS}/{job['id']}"
    client.post(f"{url}/start", json={"worker": "w"}, headers=worker)
    assert client.post(f"{url}/heartbeat", headers=worker).json() == {"state": "running", "cancel_requested": False}
    assert client.post(f"{url}/cancel", headers=admin).json()["state"] == "running"
    assert client.post(f"{url}/heartbeat", headers=worker).json()["cancel_requested"] is True
    assert client.post(f"{url}/trials/claim", headers=worker).json()["granted"] is False


def test_silent_worker_fails_the_job(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    worker = worker_of(client)
    job = client.post(JOBS, json={"dataset": "iris", "target": "target"}, headers=admin).json()
    client.post(f"{JOBS}/{job['id']}/start", json={"worker": "doomed"}, headers=worker)
    deadline = time.monotonic() + 10
    while (read := client.get(f"{JOBS}/{job['id']}", headers=admin).json())[
        "state"
    ] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert read["state"] == "failed" and "no heartbeat" in read["reason"] and "doomed" in read["reason"]


def test_dataset_version_in_use_cannot_be_deleted(jc: tuple[TestClient, dict[str, str]]) -> None:
    client, admin = jc
    job = client.post(JOBS, json={"dataset": "iris", "target": "target"}, headers=admin).json()
    assert_problem(
        client.delete("/api/v1/projects/demo/datasets/iris/versions/1", headers=admin), 409, f"job {job['id']}"
    )
    assert client.get("/api/v1/projects/demo/datasets/iris/versions/1/file", headers=admin).status_code == 200


def test_a_project_with_a_live_job_is_not_deleted_nor_one_mlflow_must_forget_while_it_is_away(
    jc: tuple[TestClient, dict[str, str]],
) -> None:
    """A queued job would write runs and models into MLflow after they were deleted: 409, naming
    it and how to go on. Cancelled, the job no longer writes, but it ran in the project, so MLflow
    must forget the project first: with MLflow away the delete is a 503 and nothing is deleted."""
    client, admin = jc
    job = client.post(JOBS, json={"dataset": "iris", "target": "target"}, headers=admin).json()
    assert_problem(client.delete("/api/v1/projects/demo", headers=admin), 409, f"job {job['id']}", "cancel")

    def kept() -> None:
        assert client.get(f"{JOBS}/{job['id']}", headers=admin).status_code == 200
        assert client.get("/api/v1/projects/demo/datasets/iris/versions/1/file", headers=admin).status_code == 200

    kept()
    assert client.post(f"{JOBS}/{job['id']}/cancel", headers=admin).json()["state"] == "cancelled"
    assert_problem(client.delete("/api/v1/projects/demo", headers=admin), 503, "MLflow")
    kept()


def test_jobs_of_another_project_are_invisible(
    jc: tuple[TestClient, dict[str, str]], make_key_for: Callable[..., dict[str, str]]
) -> None:
    client, admin = jc
    job = client.post(JOBS, json={"dataset": "iris", "target": "target"}, headers=admin).json()
    client.post("/api/v1/projects", json={"name": "other"}, headers=admin)
    outsider = make_key_for(client, "engineer", "other")
    for method, suffix in (("GET", ""), ("GET", "/logs"), ("POST", "/cancel")):
        assert_problem(client.request(method, f"{JOBS}/{job['id']}{suffix}", headers=outsider), 404)
    # The worker's routes are the worker service's alone: no person's key reaches them.
    for key in (outsider, make_key_for(client, "engineer", "demo"), admin):
        for suffix in ("/heartbeat", "/trials/claim"):
            assert_problem(client.post(f"{JOBS}/{job['id']}{suffix}", headers=key), 403, "worker service only")
        assert_problem(
            client.post(f"{JOBS}/{job['id']}/run", json={"mlflow_run_id": "0" * 32}, headers=key), 403, "worker"
        )
    assert client.get(f"{JOBS}/{job['id']}", headers=admin).json()["mlflow_run_id"] is None
    assert client.get("/api/v1/projects/other/jobs", headers=outsider).json() == []
    viewer = make_key_for(client, "viewer", "demo")
    assert client.get(f"{JOBS}/{job['id']}", headers=viewer).status_code == 200
    assert_problem(client.post(f"{JOBS}/{job['id']}/cancel", headers=viewer), 403, "engineer")


def test_a_job_submitted_twice_keeps_its_first_flow_run(jc: tuple[TestClient, dict[str, str]]) -> None:
    """The request that queued a job and the api's loop (or a second api) may both submit it:
    the first flow run stays the job's, and its log says "submitted" once."""
    from miniml.services import jobs

    client, admin = jc
    job = client.post(JOBS, json={"dataset": "iris", "target": "target", "max_trials": 1}, headers=admin).json()
    for run in ("first-run", "second-run"):
        with client.app.state.db.begin() as session:  # type: ignore[attr-defined]
            jobs.mark_submitted(session, job["id"], run)
    assert client.get(f"{JOBS}/{job['id']}", headers=admin).json()["flow_run_id"] == "first-run"
    logs = [line["message"] for line in client.get(f"{JOBS}/{job['id']}/logs", headers=admin).json()]
    assert sum("submitted to Prefect" in m for m in logs) == 1, logs
