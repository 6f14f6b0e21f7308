"""End to end through real processes: Prefect server, `miniml worker`, MLflow server, the api."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from miniml.monitoring.gpu import visible_gpus
from miniml.sdk.client import Client
from tests.conftest import LiveApi
from tests.orchestration.conftest import IRIS, Workers, slow_dataset, trainers_of, wait_for

pytestmark = pytest.mark.slow


def test_job_waits_for_a_worker_then_runs_through_prefect(
    platform: tuple[LiveApi, Client, Workers], prefect_api: str
) -> None:
    api, client, start_workers = platform
    job = client.jobs.create(
        "demo",
        dataset="iris",
        target="target",
        max_trials=4,
        families=["linear", "random_forest"],
        resources={"cpu": 1, "memory": "1Gi"},  # a Kubernetes pool's; a process worker runs it as it is
    )
    assert job.state == "queued" and job.spec["resources"] == {"cpu": 1.0, "memory": "1Gi", "gpu": 0}
    time.sleep(2)
    assert client.jobs.get("demo", job.id).state == "queued"
    if not client.jobs.get("demo", job.id).flow_run_id:
        ready = httpx.get(f"{api.url}/readyz", timeout=30).json()
        worker_check = next(c for c in ready["checks"] if c["name"] == "worker")
        assert worker_check["ok"] is False and "miniml worker" in worker_check["detail"]
    start_workers(1)
    done = client.jobs.wait("demo", job.id, timeout_s=240)
    assert done.state == "succeeded", (done.reason, [line.message for line in client.jobs.logs("demo", job.id)])
    assert done.flow_run_id and done.model_version
    # The flow reports the job's end to the api, then returns; Prefect hears of it a moment later.
    deadline = time.monotonic() + 60
    while (run := httpx.get(f"{prefect_api}/flow_runs/{done.flow_run_id}", timeout=10).json())[
        "state_type"
    ] != "COMPLETED":
        assert run["state_type"] == "RUNNING" and time.monotonic() < deadline, run["state_type"]
        time.sleep(0.5)
    assert run["name"] == f"job-{job.id}"

    # A job that asks for a GPU fails at once on a worker without one, naming the way out.
    gpus = visible_gpus()
    gpu_job = client.jobs.create("demo", dataset="iris", target="target", max_trials=2, resources={"gpu": 1})
    ended = client.jobs.wait("demo", gpu_job.id, timeout_s=120)
    if gpus:
        assert ended.state == "succeeded", ended.reason
    else:
        assert ended.state == "failed" and ended.progress.trials_done == 0
        assert "asks for 1 GPU(s)" in str(ended.reason) and "sees 0" in str(ended.reason), ended.reason
        assert "Kubernetes work pool" in str(ended.reason)


def test_killed_worker_fails_the_job_instead_of_leaving_it_running(platform: tuple[LiveApi, Client, Workers]) -> None:
    api, client, start_workers = platform
    [worker] = start_workers(1)
    job = client.jobs.create("demo", dataset="iris", target="target", timeout_s=600, families=["random_forest"])
    wait_for(lambda: client.jobs.get("demo", job.id).progress.trials_done >= 1, 180, "the first trial")
    os.killpg(worker.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: client.jobs.get("demo", job.id).state != "running", 60, "the job to leave running")
    final = client.jobs.get("demo", job.id)
    assert final.state == "failed" and "no heartbeat" in (final.reason or "")
    assert time.monotonic() - killed < 60
    # Its trainer was in a session of its own, out of reach of the kill: it ends itself with its runner.
    assert trainers_of(job.id, api.settings.data_dir) == []


def test_cancel_through_a_worker_stops_the_fit_and_frees_its_cores(
    platform: tuple[LiveApi, Client, Workers], mlflow_uri: str, tmp_path: Path
) -> None:
    """A cancel reaches a trial mid-fit on a real worker: the job ends cancelled within 30 s and no
    process of it is left under the worker; its MLflow runs end KILLED."""
    from mlflow.tracking import MlflowClient

    api, client, start_workers = platform
    [worker] = start_workers(1)
    client.datasets.upload("demo", slow_dataset(tmp_path / "slow.parquet"))
    job = client.jobs.create("demo", dataset="slow", target="label", max_trials=4, families=["random_forest"], seed=0)

    def fitting() -> bool:
        under_worker = {p.pid for p in psutil.Process(worker.pid).children(recursive=True)}
        return client.jobs.get("demo", job.id).progress.trials_claimed >= 1 and any(
            p.pid in under_worker for p in trainers_of(job.id, api.settings.data_dir)
        )

    wait_for(fitting, 240, "a trial fitting in the job's trainer under the worker")
    time.sleep(2)
    assert client.jobs.get("demo", job.id).progress.trials_done == 0
    asked = time.monotonic()
    client.jobs.cancel("demo", job.id)
    wait_for(lambda: client.jobs.get("demo", job.id).state != "running", 30, "the job to end")
    took = time.monotonic() - asked
    final = client.jobs.get("demo", job.id)
    assert final.state == "cancelled" and took < 30, (final.state, took)
    assert trainers_of(job.id, api.settings.data_dir) == []
    left = [" ".join(p.cmdline()) for p in psutil.Process(worker.pid).children(recursive=True)]
    # Only the worker's trainer server (it forks trainers) is left of the training processes.
    assert not any("miniml.orchestration.trainer" in c and "--serve" not in c for c in left), left
    assert sum("miniml.orchestration.trainer --serve" in c for c in left) == 1, left
    mc = MlflowClient(mlflow_uri)
    parent = mc.get_run(str(final.mlflow_run_id))
    children = mc.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{final.mlflow_run_id}'")
    assert parent.info.status == "KILLED" and {c.info.status for c in children} == {"KILLED"}
    print(f"cancel through the worker took {took:.1f}s")


@pytest.mark.postgres
@pytest.mark.pg
def test_two_workers_share_one_study_on_postgres(platform: tuple[LiveApi, Client, Workers]) -> None:
    _api, client, start_workers = platform
    # Both polling before the job exists, so each shard finds its own worker. A shard claims at
    # most its share (8 of 16) while the other one's process may still be starting.
    start_workers(2, wait=True, extra={"MINIML_WORKER__SHARD_GRACE_S": "240"})
    job = client.jobs.create(
        "demo", dataset="iris", target="target", max_trials=16, parallelism=2, families=["random_forest"]
    )
    done = client.jobs.wait("demo", job.id, timeout_s=300)
    assert done.state == "succeeded", (done.reason, [line.message for line in client.jobs.logs("demo", job.id)])
    numbers = [t.number for t in done.leaderboard]
    assert len(numbers) == 16 and sorted(numbers) == list(range(16))
    by_worker = Counter(t.worker for t in done.leaderboard)
    assert len(by_worker) == 2, (by_worker, [line.message for line in client.jobs.logs("demo", job.id)])


def test_the_seed_flow_end_to_end_over_http(platform: tuple[LiveApi, Client, Workers]) -> None:
    """The seed's five steps through HTTP: project, upload, train (a real worker via Prefect), deploy Staging, predict."""
    from fastapi.testclient import TestClient

    from miniml.inference.app import create_inference_app

    api, client, start_workers = platform
    start_workers(1)
    h = api.headers
    assert httpx.post(f"{api.url}/projects", json={"name": "seed"}, headers=h).status_code == 201
    with IRIS.open("rb") as fh:
        up = httpx.post(
            f"{api.url}/datasets/upload", params={"project": "seed"}, files={"file": ("iris.csv", fh)}, headers=h
        )
    assert up.status_code == 201
    body = {
        "project": "seed",
        "dataset_s3_uri": up.json()["s3_uri"],
        "target": "target",
        "model_name": "demo-iris",
        "max_trials": 4,
    }
    train = httpx.post(f"{api.url}/experiments/train", json=body, headers=h)
    assert train.status_code == 202
    done = client.jobs.wait("seed", train.json()["id"], timeout_s=240)
    assert done.state == "succeeded", done.reason
    deploy = httpx.post(
        f"{api.url}/deploy",
        json={"model_name": "demo-iris", "stage": "Staging", "project": "seed"},
        headers=h,
        timeout=30,
    )
    assert deploy.status_code == 201, deploy.text
    with TestClient(create_inference_app(api.settings)) as inference:
        deadline = time.monotonic() + 30
        row = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
        while (answer := inference.post("/predict", json={"rows": [row]}, headers=h)).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.3)
        assert answer.json() == {"preds": ["Iris-setosa"]}


def test_drift_over_the_threshold_retrains_and_promotes_only_a_better_challenger(
    platform: tuple[LiveApi, Client, Workers], mlflow_uri: str
) -> None:
    """Drift check, retraining job, evaluation: three kinds of Prefect flow runs on a real worker."""
    import pandas as pd
    from fastapi.testclient import TestClient
    from sklearn.dummy import DummyClassifier

    from miniml.inference.app import create_inference_app
    from miniml.tracking.runs import Tracker
    from tests.inference.test_serving import register, wait_served

    api, client, start_workers = platform
    start_workers(1, extra={"MINIML_WORKER__CONCURRENCY": "3"})  # both retrainings run side by side
    first = client.jobs.create("demo", dataset="iris", target="target", max_trials=1, families=["linear"])
    good = client.jobs.wait("demo", first.id, timeout_s=240)
    assert good.state == "succeeded" and good.model_version
    # A poor champion with the same lineage (job, dataset): the retrained challenger must beat it.
    # (Version numbers depend on earlier tests: MLflow is shared by the session.)
    poor = DummyClassifier(strategy="constant", constant="Iris-virginica")
    champion = register(Tracker(mlflow_uri), "demo", "iris", poor, job=first.id, settings=api.settings)
    client.deployments.create("demo", "auto", "iris", target=int(champion))
    client.deployments.set_monitoring(
        "demo", "auto", drift_interval_s=0, retrain={"drift_threshold": 0.25, "min_improvement": 0.05}
    )
    # The good champion, retrained with the same spec on the same data: the challenger is no better.
    client.deployments.create("demo", "steady", "iris", target=int(good.model_version))
    settings = api.settings.model_copy(
        update={"inference": api.settings.inference.model_copy(update={"reconcile_s": 0.5})}
    )
    with TestClient(create_inference_app(settings)) as inference:
        wait_served(inference, "auto", {champion}, timeout=30)
        rows = pd.read_csv(IRIS).sample(300, replace=True, random_state=0).drop(columns="target")
        rows["petal_length"] += 3
        for start in range(0, 300, 100):
            chunk = rows.iloc[start : start + 100].to_dict("records")
            r = inference.post("/v1/endpoints/auto/predict", json={"rows": chunk}, headers=api.headers)
            assert r.status_code == 200, r.text
        inference.app.state.capture.flush()  # type: ignore[attr-defined]

        check = client.deployments.check_drift("demo", "auto")
        again = client.deployments.retrain("demo", "steady")
        assert again.trigger == "manual" and again.champion_version == good.model_version
        report = client.deployments.wait_drift("demo", "auto", check.id, timeout_s=120)
        assert report.state == "done" and "petal_length" in report.drifted, report
        assert report.flow_run_id

        def settled(name: str) -> list[Any]:
            found = client.deployments.retrainings("demo", name)
            return found if found and found[0].state not in ("training", "evaluating") else []

        wait_for(lambda: bool(settled("auto")) and bool(settled("steady")), 300, "both retrainings")
        [won] = settled("auto")
        assert won.trigger == "drift" and won.drift_report_id == report.id
        assert won.state == "promoted" and won.promoted and won.champion_version == champion, won.reason
        challenger = won.challenger_version
        assert challenger == client.jobs.get("demo", won.job_id).model_version
        assert won.challenger_score is not None and won.champion_score is not None
        assert won.challenger_score >= won.champion_score + 0.05
        assert client.deployments.get("demo", "auto").desired[0].version == challenger
        wait_served(inference, "auto", {challenger}, timeout=30)

        [kept] = settled("steady")
        assert kept.state == "kept" and not kept.promoted and "not promoted" in (kept.reason or ""), kept
        assert client.deployments.get("demo", "steady").desired[0].version == good.model_version
        audit = httpx.get(f"{api.url}/api/v1/audit", params={"project": "demo"}, headers=api.headers).json()
        assert any("retrain" in e["action"] and "promoted" in e["action"] for e in audit)
        assert any("retrain" in e["action"] and "kept" in e["action"] for e in audit)


def test_the_api_speaks_to_prefect_without_its_package(prefect_api: str, tmp_path: Path) -> None:
    """The api's Prefect calls go over Prefect's REST API: the api process never imports `prefect`
    (its client is ~31 MB and a second of start-up); a deployment no worker registered is named."""
    code = f"""
import json, sys
import miniml.api.app
from miniml.config import Settings
from miniml.orchestration.submit import Orchestrator
orchestrator = Orchestrator(Settings(data_dir={str(tmp_path)!r}, prefect={{"api_url": {prefect_api!r}}}), None)
ok, detail = orchestrator.worker_status()
try:
    orchestrator._run("miniml-train/no-such-deployment", "job-1", {{}}, "demo", 0.0)
    missing = ""
except Exception as exc:
    missing = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps({{"prefect": "prefect" in sys.modules, "detail": detail, "missing": missing}}))
"""
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["prefect"] is False
    assert "miniml-train/miniml" in result["detail"]
    assert result["missing"].startswith("DeploymentMissing") and "start `miniml worker`" in result["missing"]
