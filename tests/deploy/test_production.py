"""Production mode without Docker: every role as a process on PostgreSQL and S3 (moto's server),
with two workers and two inference replicas, through the seed's lifecycle."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import psycopg
import pytest

from miniml.config import Settings
from miniml.processes import BIN, Service, Supervisor
from miniml.sdk.client import Client
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"
ROW = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


@pytest.fixture
def production(tmp_path: Path, pg_url: str, s3_endpoint: str) -> Iterator[tuple[Settings, list[str]]]:
    base, _, miniml_db = pg_url.rpartition("/")
    admin_dsn = pg_url.replace("postgresql+psycopg://", "postgresql://").rsplit("/", 1)[0] + "/postgres"
    extra = [f"{miniml_db}_mlflow", f"{miniml_db}_prefect"]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for name in extra:
            conn.execute(f'CREATE DATABASE "{name}"')
    creds = {
        "AWS_ACCESS_KEY_ID": "prod-access",
        "AWS_SECRET_ACCESS_KEY": "prod-secret-value",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="prod-access",
        aws_secret_access_key="prod-secret-value",
        region_name="us-east-1",
    )
    suffix = miniml_db.rsplit("_", 1)[-1]
    for bucket in (f"miniml-{suffix}", f"mlflow-{suffix}"):
        s3.create_bucket(Bucket=bucket)
    inference_ports = [free_port(), free_port()]
    settings = Settings(
        mode="production",
        data_dir=tmp_path / "data",
        api={"port": free_port()},
        mlflow={"port": free_port()},
        prefect={"port": free_port()},
        inference={"port": inference_ports[0]},
    )
    common = {
        "MINIML_MODE": "production",
        "MINIML_DB__URL": pg_url,
        "MINIML_STORAGE__KIND": "s3",
        "MINIML_STORAGE__BUCKET": f"miniml-{suffix}",
        "MINIML_STORAGE__ENDPOINT_URL": s3_endpoint,
        "MINIML_STORAGE__ACCESS_KEY_ID": "prod-access",
        "MINIML_STORAGE__SECRET_ACCESS_KEY": "prod-secret-value",
        "MINIML_WORKER__CONCURRENCY": "1",
        "MINIML_WORKER__TRIAL_THREADS": "1",
        "MINIML_INFERENCE__RECONCILE_S": "1",
    }
    py = sys.executable
    services = [
        Service(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                f"{base}/{extra[0]}",
                "--artifacts-destination",
                f"s3://mlflow-{suffix}",
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(settings.mlflow.port),
                "--workers",
                "1",
            ],
            settings.mlflow.port,
            f"{settings.mlflow_uri}/health",
            env={**creds, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
        ),
        Service(
            "prefect",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(settings.prefect.port)],
            settings.prefect.port,
            f"{settings.prefect_api_url}/health",
            env={"PREFECT_API_DATABASE_CONNECTION_URL": f"{base.replace('+psycopg', '+asyncpg')}/{extra[1]}"},
        ),
        Service("api", [py, "-m", "miniml", "api"], settings.api.port, f"{settings.api_url}/healthz", env=common),
        Service("worker-1", [py, "-m", "miniml", "worker"], None, None, env=common, phase=1),
        Service("worker-2", [py, "-m", "miniml", "worker"], None, None, env=common, phase=1),
    ] + [
        Service(
            f"inference-{i}",
            [py, "-m", "miniml", "inference"],
            port,
            f"http://127.0.0.1:{port}/healthz",
            phase=1,
            env=common
            | {
                "MINIML_INFERENCE__PORT": str(port),
                "MINIML_INFERENCE__REPLICA_ID": f"replica-{i}",
                "MINIML_INFERENCE__PUBLIC_URL": f"http://127.0.0.1:{port}",
            },
        )
        for i, port in enumerate(inference_ports, start=1)
    ]
    import signal as _signal

    for svc in services:
        if svc.name.startswith("worker"):
            svc.stop_signal = _signal.SIGINT
    for svc in services:
        if svc.name.startswith("worker"):
            # A shard keeps the other's share for up to 4 minutes: its process may start slowly
            # on a loaded machine, and this test is about both workers taking part.
            svc.env = svc.env | {"MINIML_WORKER__SHARD_GRACE_S": "240"}
    sup = Supervisor(settings, services)
    try:
        sup.start_all()
        # Workers have no health URL: wait until both poll Prefect, so each shard finds one.
        logs = [sup.log_dir / f"{svc.name}.log" for svc in services if svc.name.startswith("worker")]
        deadline = time.monotonic() + 180
        while not all(log.exists() and "being served" in log.read_text(errors="replace") for log in logs):
            assert time.monotonic() < deadline, "the workers never started polling Prefect"
            time.sleep(0.5)
        yield settings, [f"http://127.0.0.1:{p}" for p in inference_ports]
    finally:
        sup.stop_all()
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            for name in extra:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_lifecycle_on_postgres_and_s3_with_two_workers_and_two_replicas(
    production: tuple[Settings, list[str]],
) -> None:
    settings, replicas = production
    key = (settings.data_dir / "admin.key").read_text().strip()
    headers = {"X-API-Key": key}
    client = Client(settings.api_url, api_key=key, timeout=60)
    client.projects.create("prod")
    version = client.datasets.upload("prod", IRIS)
    assert version.uri.startswith("s3://miniml-")
    job = client.jobs.create(
        "prod",
        dataset="iris",
        target="target",
        model_name="iris",
        max_trials=10,
        parallelism=2,
        families=["random_forest", "linear"],
    )
    done = client.jobs.wait("prod", job.id, timeout_s=400)
    assert done.state == "succeeded", (done.reason, [line.message for line in client.jobs.logs("prod", job.id)])
    numbers = sorted(t.number for t in done.leaderboard)
    assert numbers == list(range(10))
    assert len({t.worker for t in done.leaderboard}) == 2, {t.worker for t in done.leaderboard}
    client.deployments.create("prod", "iris-prod", "iris", target="staging")
    answers = {}
    for url in replicas:
        deadline = time.monotonic() + 90
        while True:
            r = httpx.post(f"{url}/v1/endpoints/iris-prod/predict", json={"rows": [ROW]}, headers=headers, timeout=10)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        answers[url] = r.json()
    assert {a["model_version"] for a in answers.values()} == {done.model_version}
    assert {a["predictions"][0] for a in answers.values()} == {"Iris-setosa"}
    status = client.deployments.get("prod", "iris-prod")
    assert {r.replica for r in status.replicas} == {"replica-1", "replica-2"}
    api_metrics = httpx.get(f"{settings.api_url}/metrics").text
    assert (
        'miniml_api_requests_total{method="POST",route="/api/v1/projects/{project}/jobs",status="202"}' in api_metrics
    )
    for url in replicas:
        assert 'miniml_inference_requests_total{deployment="iris-prod",status="200"' in httpx.get(f"{url}/metrics").text
