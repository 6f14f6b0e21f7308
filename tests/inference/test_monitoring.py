"""Drift checks, feedback and live quality through the live api, a real MLflow and the inference service.

The worker's part of a drift check (``run_drift_check``, what the Prefect flow calls) runs in the
test process here; tests/orchestration runs it through Prefect and a real worker.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from miniml.config import Settings
from miniml.inference.app import create_inference_app
from miniml.orchestration.monitor import run_drift_check
from miniml.sdk.client import Client
from miniml.tracking.runs import Tracker
from tests.conftest import LiveApi, assert_problem, free_port
from tests.inference.test_serving import register, wait_served

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]

Stack = tuple[LiveApi, Client, TestClient, str, Settings]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> Iterator[Stack]:
    """A project with iris uploaded, a (queued) job on it, and version 1 registered as that job's model.

    Shared by the module's tests (each uses deployments of its own) to save the setup's seconds.
    """
    project = f"m{uuid.uuid4().hex[:8]}"
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("monitoring") / "d",
        api={"port": free_port()},
        prefect={"port": free_port()},  # nothing listens: checks stay queued, the test runs the worker part
        mlflow={"tracking_uri": mlflow_uri},
        inference={"port": free_port(), "reconcile_s": 0.5, "key_cache_s": 0, "capture_flush_s": 3600},
        monitoring={"drift_min_rows": 50},
        jobs={"loop_interval_s": 1},
    )
    with LiveApi(settings) as api:
        client = Client(api.url, api_key=api.key)
        client.projects.create(project)
        client.datasets.upload(project, IRIS)
        job = client.jobs.create(project, dataset="iris", target="target", max_trials=1)
        assert (
            register(
                Tracker(mlflow_uri), project, "iris", LogisticRegression(max_iter=500), job=job.id, settings=settings
            )
            == "1"
        )
        with TestClient(create_inference_app(settings)) as inference:
            yield api, client, inference, project, settings


def send(inference: TestClient, name: str, key: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"predictions": [], "prediction_ids": []}
    for start in range(0, len(rows), 100):
        r = inference.post(
            f"/v1/endpoints/{name}/predict", json={"rows": rows[start : start + 100]}, headers={"X-API-Key": key}
        )
        assert r.status_code == 200, r.text
        out["predictions"] += r.json()["predictions"]
        out["prediction_ids"] += r.json()["prediction_ids"]
    return out


def sample(rows: int, seed: int, shift: float = 0.0) -> pd.DataFrame:
    frame = pd.read_csv(IRIS).sample(rows, replace=True, random_state=seed).reset_index(drop=True)
    frame["petal_length"] = frame["petal_length"] + shift
    return frame


def gauges(api: LiveApi) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{api.url}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def check(api: LiveApi, client: Client, inference: TestClient, project: str, settings: Settings, name: str) -> Any:
    inference.app.state.capture.flush()  # type: ignore[attr-defined]
    queued = client.deployments.check_drift(project, name)
    assert queued.state == "queued" and queued.reference == {
        "dataset": "iris",
        "version": 1,
        "job_id": queued.reference["job_id"],
    }
    assert run_drift_check(api.worker_client(), settings, project, name, queued.id) == "done"
    return client.deployments.drift(project, name).latest


def test_drift_in_distribution_and_shifted_with_the_same_numbers_in_the_gauges(stack: Stack) -> None:
    api, client, inference, project, settings = stack
    for name in ("steady", "shifted"):
        client.deployments.create(project, name, "iris", target=1)
        wait_served(inference, name, {"1"})
    send(inference, "steady", api.key, sample(600, seed=1).drop(columns="target").to_dict("records"))
    send(inference, "shifted", api.key, sample(600, seed=2, shift=3.0).drop(columns="target").to_dict("records"))

    steady = check(api, client, inference, project, settings, "steady")
    assert steady is not None and steady.rows == 600 and steady.model_version == "1"
    assert {f.feature for f in steady.features} == set(FEATURES)
    assert all(f.psi < 0.1 for f in steady.features), steady.features
    shifted = check(api, client, inference, project, settings, "shifted")
    by_name = {f.feature: f for f in shifted.features}
    assert by_name["petal_length"].psi > 0.25 and shifted.drifted == ["petal_length"]
    assert all(by_name[c].psi < 0.1 for c in FEATURES if c != "petal_length")

    g = gauges(api)
    for report in (steady, shifted):
        for f in report.features:
            labels = (("deployment", report.deployment), ("feature", f.feature), ("project", project))
            assert g[("miniml_feature_drift_psi", labels)] == pytest.approx(f.psi)
        labels2 = (("deployment", report.deployment), ("project", project))
        assert g[("miniml_prediction_drift_psi", labels2)] == pytest.approx(report.prediction_psi)


def test_a_check_with_too_little_traffic_reports_no_data(stack: Stack) -> None:
    api, client, inference, project, settings = stack
    client.deployments.create(project, "quiet", "iris", target=1)
    wait_served(inference, "quiet", {"1"})
    send(inference, "quiet", api.key, sample(10, seed=3).drop(columns="target").to_dict("records"))
    inference.app.state.capture.flush()  # type: ignore[attr-defined]
    queued = client.deployments.check_drift(project, "quiet")
    assert run_drift_check(api.worker_client(), settings, project, "quiet", queued.id) == "no_data"
    reports = client.deployments.drift(project, "quiet")
    assert reports.latest is None and reports.history[0].state == "no_data"
    assert "only 10 captured rows" in (reports.history[0].error or "")


def test_a_deployment_made_again_under_a_name_does_not_read_the_earlier_ones_capture(stack: Stack) -> None:
    """Captured rows live under the project's and the deployment's names; a deployment made again
    under a name (or in a project made again under a deleted one's name) reads only rows captured
    since it was made: the earlier one's 600 rows are not its traffic."""
    api, client, inference, project, settings = stack
    client.deployments.create(project, "again", "iris", target=1)
    wait_served(inference, "again", {"1"})
    send(inference, "again", api.key, sample(600, seed=4).drop(columns="target").to_dict("records"))
    inference.app.state.capture.flush()  # type: ignore[attr-defined]
    client.deployments.delete(project, "again")
    time.sleep(0.01)  # the new deployment is made after the last captured row (times in ms)
    client.deployments.create(project, "again", "iris", target=1)
    queued = client.deployments.check_drift(project, "again")
    assert run_drift_check(api.worker_client(), settings, project, "again", queued.id) == "no_data"
    assert "only 0 captured rows" in (client.deployments.drift(project, "again").history[0].error or "")


def test_drift_routes_check_roles_tenancy_and_state(stack: Stack) -> None:
    api, client, _inference, project, _settings = stack
    client.deployments.create(project, "guarded", "iris", target=1)
    base = f"{api.url}/api/v1/projects/{project}/deployments/guarded"
    viewer = {"X-API-Key": client.keys.create("viewer", projects=[project]).key}
    engineer = {"X-API-Key": client.keys.create("engineer", projects=[project]).key}
    client.projects.create(other := f"o{uuid.uuid4().hex[:8]}")
    stranger = {"X-API-Key": client.keys.create("engineer", projects=[other]).key}

    assert_problem(httpx.post(f"{base}/drift/check", headers=viewer), 403, "engineer")
    assert_problem(
        httpx.get(f"{base}/drift", headers={"X-API-Key": client.keys.create("engineer", projects=[other]).key}),
        404,
        "does not exist",
    )
    assert_problem(httpx.put(f"{base}/monitoring", json={"drift_interval_s": 60}, headers=engineer), 403, "admin")
    assert_problem(httpx.post(f"{base}/retrain", headers=engineer), 403, "admin")
    assert_problem(httpx.get(f"{base}/quality", headers=stranger), 404)
    assert httpx.get(f"{base}/drift", headers=viewer).json() == {"latest": None, "history": []}

    first = httpx.post(f"{base}/drift/check", headers=engineer)
    assert first.status_code == 202 and first.json()["state"] == "queued"
    assert_problem(httpx.post(f"{base}/drift/check", headers=engineer), 409, "still queued")
    report_id = first.json()["id"]
    done = {"state": "done", "rows": 5, "features": [], "max_psi": 0.0}
    # Results come from the worker service alone: a person's key, even an admin's, cannot forge one.
    for person in (engineer, api.headers):
        assert_problem(
            httpx.post(f"{base}/drift/{report_id}/result", json=done, headers=person), 403, "worker service only"
        )
        assert_problem(httpx.get(f"{base}/drift/{report_id}/context", headers=person), 403, "worker")
    worker = {"X-API-Key": api.worker_key}
    assert httpx.post(f"{base}/drift/{report_id}/result", json=done, headers=worker).status_code == 200
    assert_problem(httpx.post(f"{base}/drift/{report_id}/result", json=done, headers=worker), 409, "already done")
    assert_problem(httpx.post(f"{base}/drift/999/result", json=done, headers=worker), 404, "999")
    assert_problem(
        httpx.post(f"{base}/drift/{report_id}/result", json={"state": "great"}, headers=worker), 422, "state"
    )
    assert len(httpx.get(f"{base}/drift", headers=viewer).json()["history"]) == 1  # nothing more was written


def test_monitoring_settings_validate_and_persist(stack: Stack) -> None:
    api, client, _inference, project, _settings = stack
    client.models.promote(project, "iris", "1", "staging")
    client.deployments.create(project, "policy", "iris", target="staging")
    url = f"{api.url}/api/v1/projects/{project}/deployments/policy/monitoring"
    assert httpx.get(url, headers=api.headers).json() == {
        "deployment": "policy",
        "drift_interval_s": 600,
        "drift_window_s": 3600,
        "retrain": None,
    }
    assert_problem(httpx.put(url, json={"retrain": {"schedule": "every tuesday"}}, headers=api.headers), 422, "cron")
    assert_problem(
        httpx.put(url, json={"retrain": {"drift_threshold": -1}}, headers=api.headers), 422, "drift_threshold"
    )
    assert_problem(httpx.put(url, json={"drift_window_s": 5}, headers=api.headers), 422, "drift_window_s")
    assert httpx.get(url, headers=api.headers).json()["retrain"] is None  # nothing was written
    policy = {"schedule": "0 3 * * *", "drift_threshold": 0.25, "min_improvement": 0.01, "dataset": "latest"}
    saved = client.deployments.set_monitoring(project, "policy", drift_interval_s=120, retrain=policy)
    assert saved.drift_interval_s == 120 and saved.retrain is not None and saved.retrain.model_dump() == policy
    assert client.deployments.set_monitoring(project, "policy", retrain=None).retrain is None
    assert client.deployments.monitoring(project, "policy").drift_interval_s == 120


def test_a_retraining_policy_needs_one_champion(stack: Stack, mlflow_uri: str) -> None:
    api, client, _inference, project, settings = stack
    job = client.jobs.list(project)[0]
    register(
        Tracker(mlflow_uri), project, "iris", LogisticRegression(C=0.1, max_iter=500), job=job.id, settings=settings
    )
    client.deployments.create(
        project, "split", "iris", traffic=[{"version": 1, "weight": 50}, {"version": 2, "weight": 50}]
    )
    url = f"{api.url}/api/v1/projects/{project}/deployments/split"
    assert_problem(
        httpx.put(f"{url}/monitoring", json={"retrain": {"drift_threshold": 0.2}}, headers=api.headers),
        422,
        "splits traffic",
    )
    assert_problem(httpx.post(f"{url}/retrain", headers=api.headers), 422, "splits traffic")
    assert client.deployments.retrainings(project, "split") == []


def test_feedback_gives_the_accuracy_computed_here(stack: Stack) -> None:
    api, client, inference, project, _settings = stack
    client.deployments.create(project, "graded", "iris", target=1)
    wait_served(inference, "graded", {"1"})
    frame = sample(120, seed=9)
    served = send(inference, "graded", api.key, frame.drop(columns="target").to_dict("records"))
    ids, predicted, truth = served["prediction_ids"], served["predictions"], frame["target"].tolist()
    assert len(set(ids)) == 120

    url = "/v1/endpoints/graded/feedback"
    bad = inference.post(
        url,
        json={"feedback": [{"prediction_id": ids[0], "label": truth[0]}, {"prediction_id": "nope.1.0", "label": "x"}]},
        headers=api.headers,
    )
    assert_problem(bad, 404, "nope.1.0", "nothing was stored")
    assert_problem(inference.post(url, content=b"{", headers=api.headers), 422, "JSON")
    assert_problem(inference.post(url, json={"label": "x"}, headers=api.headers), 422, "prediction_id")
    other = client.keys.create("engineer", projects=[client.projects.create(f"o{uuid.uuid4().hex[:8]}").name]).key
    assert_problem(
        inference.post(url, json={"prediction_id": ids[0], "label": truth[0]}, headers={"X-API-Key": other}), 404
    )
    assert client.deployments.quality(project, "graded").labelled == 0  # nothing was stored by the refusals

    single = inference.post(url, json={"prediction_id": ids[0], "label": "wrong-label"}, headers=api.headers)
    assert single.status_code == 200 and single.json() == {"stored": 1}
    batch = {"feedback": [{"prediction_id": i, "label": y} for i, y in zip(ids, truth, strict=True)]}
    assert inference.post(url, json=batch, headers=api.headers).json() == {"stored": 120}  # the first is corrected

    q = client.deployments.quality(project, "graded")
    assert q.task == "classification" and q.labelled == 120
    assert q.accuracy == pytest.approx(accuracy_score(truth, predicted))
    assert q.f1_macro == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert q.by_version["1"]["labelled"] == 120
    g = gauges(api)
    assert g[("miniml_model_quality", (("deployment", "graded"), ("metric", "accuracy")))] == pytest.approx(q.accuracy)


def test_monitoring_through_the_cli(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from miniml.cli import context
    from miniml.cli.main import app

    api, client, inference, project, settings = stack
    client.deployments.create(project, "cli", "iris", target=1)
    wait_served(inference, "cli", {"1"})
    monkeypatch.setenv("MINIML_URL", api.url)
    monkeypatch.setenv("MINIML_API_KEY", api.key)
    monkeypatch.setattr(context.console, "width", 250)
    monkeypatch.setattr(context.err_console, "width", 250)
    runner = CliRunner()

    def cli(*args: str) -> Any:
        result = runner.invoke(app, ["deployments", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.output) if "--json" in args else result.output

    deployed = runner.invoke(app, ["deploy", project, "cli-2", "iris", "--target", "1", "--json"])
    assert deployed.exit_code == 0 and json.loads(deployed.output)["desired"] == [{"version": "1", "weight": 100}]
    changed = cli("monitoring", project, "cli", "--drift-interval", "120", "--retrain-threshold", "0.3", "--json")
    assert changed["drift_interval_s"] == 120 and changed["retrain"]["drift_threshold"] == 0.3
    bad = runner.invoke(app, ["deployments", "monitoring", project, "cli", "--retrain-schedule", "often"])
    assert bad.exit_code == 1 and "cron" in bad.output
    assert cli("monitoring", project, "cli", "--json")["retrain"]["schedule"] is None  # nothing was written
    assert cli("monitoring", project, "cli", "--no-retrain", "--json")["retrain"] is None

    send(inference, "cli", api.key, sample(200, seed=5).drop(columns="target").to_dict("records"))
    inference.app.state.capture.flush()  # type: ignore[attr-defined]
    queued = cli("check-drift", project, "cli", "--json")
    assert queued["state"] == "queued"
    assert run_drift_check(api.worker_client(), settings, project, "cli", queued["id"]) == "done"
    shown = cli("drift", project, "cli")
    assert f"drift check {queued['id']} of cli: done, 200 rows" in shown and all(f in shown for f in FEATURES)
    assert cli("quality", project, "cli", "--json")["labelled"] == 0
    assert cli("retrainings", project, "cli", "--json") == []
    monkeypatch.setenv("MINIML_API_KEY", client.keys.create("engineer", projects=[project]).key)
    refused = runner.invoke(app, ["deployments", "retrain", project, "cli"])
    assert refused.exit_code == 1 and "error (403)" in refused.output and "admin" in refused.output


def test_the_api_loop_runs_drift_and_retraining_schedules(stack: Stack) -> None:
    import time
    from datetime import timedelta

    from miniml.db import tables
    from miniml.db.tables import utcnow

    api, client, _inference, project, _settings = stack
    client.deployments.create(project, "sched", "iris", target=1)
    client.deployments.set_monitoring(project, "sched", drift_interval_s=1)

    def wait(what: str, found: Any, timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := found()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)
        return value

    [scheduled] = wait("a scheduled drift check", lambda: client.deployments.drift(project, "sched").history)
    assert scheduled.trigger == "schedule" and scheduled.state == "queued"  # Prefect is not running here
    time.sleep(3)  # more loop ticks: a queued check is not doubled
    assert [r.id for r in client.deployments.drift(project, "sched").history] == [scheduled.id]

    yearly = "0 0 1 1 *"  # midnight, January 1st
    client.deployments.set_monitoring(project, "sched", drift_interval_s=0, retrain={"schedule": yearly})
    time.sleep(3)
    assert client.deployments.retrainings(project, "sched") == []  # the cron has not fired since it was set
    with api.app.state.db.begin() as session:  # as if the policy had been set 400 days ago
        dep = session.query(tables.Deployment).filter_by(name="sched").one()
        dep.retrain_policy = dict(dep.retrain_policy or {}) | {"_since": (utcnow() - timedelta(days=400)).isoformat()}
    [run] = wait("the scheduled retraining", lambda: client.deployments.retrainings(project, "sched"))
    assert run.trigger == "schedule" and run.state == "training" and run.champion_version == "1"
    job = client.jobs.get(project, run.job_id)
    assert job.state == "queued" and job.spec["promote_to"] == "none"
    assert any(
        "retraining of deployment sched (schedule)" in line.message for line in client.jobs.logs(project, job.id)
    )


def test_the_schedules_ask_mlflow_while_no_db_lock_is_held(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a write holds the whole DB: the schedules ask MLflow about each due deployment's
    champion before the short transaction that records its check, never inside one."""
    import sqlite3
    import time

    from sqlalchemy import select

    from miniml.db import tables
    from miniml.errors import UpstreamUnavailable

    project = f"l{uuid.uuid4().hex[:8]}"
    settings = Settings(
        data_dir=tmp_path / "d",
        api={"port": free_port()},
        prefect={"port": free_port()},
        mlflow={"tracking_uri": mlflow_uri},
        jobs={"loop_interval_s": 3600},  # the api's own loop stays out of the way: this test runs the tick
    )
    with LiveApi(settings) as api:
        client = Client(api.url, api_key=api.key)
        client.projects.create(project)
        client.datasets.upload(project, IRIS)
        job = client.jobs.create(project, dataset="iris", target="target", max_trials=1)
        register(Tracker(mlflow_uri), project, "iris", LogisticRegression(max_iter=500), job=job.id, settings=settings)
        names = ["lock-a", "lock-b", "lock-c"]
        for name in names:
            client.deployments.create(project, name, "iris", target=1)
            client.deployments.set_monitoring(project, name, drift_interval_s=1)
        time.sleep(1.2)  # all three due

        registry = api.app.state.registry
        real_run = registry.run
        lock_free: list[bool] = []

        def run(run_id: str | None) -> Any:
            probe = sqlite3.connect(settings.db_url.split("///", 1)[1], timeout=0)
            try:
                probe.execute("BEGIN IMMEDIATE")
                lock_free.append(True)
            except sqlite3.OperationalError:
                lock_free.append(False)
            finally:
                probe.close()
            return real_run(run_id)

        monkeypatch.setattr(registry, "run", run)
        with pytest.raises(UpstreamUnavailable, match="Prefect did not take"):  # none runs here: checks stay queued
            api.app.state.orchestrator.supervise_monitoring(registry)
        assert lock_free == [True] * len(names)
        with api.app.state.db.begin() as session:
            reports = list(session.scalars(select(tables.DriftReport)))
        assert sorted((r.deployment, r.trigger, r.state) for r in reports) == [(n, "schedule", "queued") for n in names]
