"""Grafana cannot run here, so its dashboards are proven the way Grafana would use them: every
panel's PromQL runs through a real Prometheus that scrapes a live api, inference service and worker.
The alert rules load, evaluate without error, and the drift alert fires on drifted traffic."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml

from miniml.monitoring.dashboards import alert_rules, panel_queries, scrape_config
from miniml.sdk.client import Client
from tests.conftest import LiveApi, LiveInference, free_port
from tests.orchestration.conftest import IRIS, Workers, wait_for

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/test installs Debian's prometheus package)")
    return found


@contextmanager
def prometheus(folder: Path, config: dict[str, Any]) -> Iterator[str]:
    folder.mkdir(parents=True)
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    (folder / "alerts.yml").write_text(yaml.safe_dump(alert_rules()))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (folder / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _ready(url), 60, "Prometheus to be ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_every_dashboard_panel_and_alert_rule_against_a_real_prometheus(
    platform: tuple[LiveApi, Client, Workers], tmp_path: Path
) -> None:
    api, client, start_workers = platform
    worker_port = free_port()
    start_workers(1, extra={"MINIML_WORKER__METRICS_PORT": str(worker_port)})
    job = client.jobs.create("demo", dataset="iris", target="target", max_trials=2, families=["linear"])
    assert client.jobs.wait("demo", job.id, timeout_s=240).state == "succeeded"
    client.deployments.create("demo", "panel", "iris", target="staging")
    inference_settings = api.settings.inference.model_copy(update={"port": free_port(), "reconcile_s": 0.5})
    settings = api.settings.model_copy(update={"inference": inference_settings})
    local = "127.0.0.1"
    config = scrape_config(
        api=[f"{local}:{api.settings.api.port}"],
        inference=[f"{local}:{inference_settings.port}"],
        worker=[f"{local}:{worker_port}"],
        interval_s=1,
    )
    with LiveInference(settings) as inference, prometheus(tmp_path / "prometheus", config) as prom:
        predict = f"{inference.url}/v1/endpoints/panel/predict"
        frame = pd.read_csv(IRIS).sample(300, replace=True, random_state=0)
        rows = frame.drop(columns="target").assign(petal_length=lambda f: f["petal_length"] + 3)
        wait_for(
            lambda: (
                httpx.post(predict, json={"rows": rows.head(1).to_dict("records")}, headers=api.headers).status_code
                == 200
            ),
            30,
            "the endpoint",
        )
        ids: list[str] = []
        for start in range(0, 300, 50):
            r = httpx.post(
                predict, json={"rows": rows.iloc[start : start + 50].to_dict("records")}, headers=api.headers
            )
            assert r.status_code == 200, r.text
            ids += r.json()["prediction_ids"]
        assert httpx.post(predict, json={"rows": [{"sepal_length": 1.0}]}, headers=api.headers).status_code == 422
        assert httpx.get(f"{api.url}/api/v1/projects/demo/deployments/nope", headers=api.headers).status_code == 404
        labels = {"feedback": [{"prediction_id": i, "label": y} for i, y in zip(ids, frame["target"], strict=True)]}
        stored = httpx.post(f"{inference.url}/v1/endpoints/panel/feedback", json=labels, headers=api.headers)
        assert stored.json() == {"stored": 300}
        inference.app.state.capture.flush()  # type: ignore[attr-defined]
        check = client.deployments.check_drift("demo", "panel")
        report = client.deployments.wait_drift("demo", "panel", check.id, timeout_s=120)
        assert report.state == "done" and "petal_length" in report.drifted, report

        drift = 'max by (feature) (miniml_feature_drift_psi{deployment="panel"})'
        wait_for(lambda: len(query(prom, drift)) == 4, 30, "Prometheus to scrape the drift gauges")
        time.sleep(3)  # a few more scrapes, so every rate() has two samples after the traffic
        empty = []
        for uid, title, expr in panel_queries():
            if "miniml_gpu_" in expr:  # no GPU here: test_gpu_panels_against_a_real_prometheus
                continue
            promql = expr.replace("$__rate_interval", "1m").replace("$deployment", ".*")
            if not query(prom, promql):
                empty.append(f"{uid} / {title}: {promql}")
        assert empty == [], "panels whose query returns no series:\n" + "\n".join(empty)

        scraped = {s["metric"]["feature"]: float(s["value"][1]) for s in query(prom, drift)}
        assert scraped == pytest.approx({f.feature: f.psi for f in report.features})
        quality = client.deployments.quality("demo", "panel")
        accuracy = query(prom, 'max(miniml_model_quality{deployment="panel", metric="accuracy"})')
        assert float(accuracy[0]["value"][1]) == pytest.approx(quality.accuracy)

        groups = httpx.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        wanted = {r["alert"] for g in alert_rules()["groups"] for r in g["rules"]}
        assert set(loaded) == wanted
        wait_for(
            lambda: all(
                r.get("lastEvaluation", "").startswith("20")
                for r in httpx.get(f"{prom}/api/v1/rules").json()["data"]["groups"][0]["rules"]
            ),
            15,
            "the rules to be evaluated",
        )
        bad = {n: r.get("lastError") for n, r in loaded.items() if r["health"] not in ("ok", "unknown")}
        assert bad == {}

        def drift_alert() -> bool:
            alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            return any(
                a["labels"]["alertname"] == "MinimlFeatureDrift"
                and a["labels"].get("feature") == "petal_length"
                and a["state"] == "firing"
                for a in alerts
            )

        wait_for(drift_alert, 20, "the drift alert to fire")


def test_gpu_panels_against_a_real_prometheus(tmp_path: Path) -> None:
    """The GPU panels' queries, on what a worker with two GPUs serves (NVML faked at its boundary)."""
    from prometheus_client import CollectorRegistry, start_http_server

    from miniml.monitoring.gpu import GpuCollector
    from tests.monitoring.test_gpu import Device, FakeNVML

    registry = CollectorRegistry()
    nvml = FakeNVML(
        [
            Device(b"NVIDIA H200", "GPU-a", busy=75, used=30 * 2**30, total=120 * 2**30),
            Device(b"NVIDIA H200", "GPU-b", busy=5, used=12 * 2**30, total=120 * 2**30),
        ]
    )
    registry.register(GpuCollector(nvml))
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    gpu_queries = [(title, expr) for _, title, expr in panel_queries() if "miniml_gpu_" in expr]
    assert {title for title, _ in gpu_queries} == {"GPU utilisation", "GPU memory used"}
    try:
        config = scrape_config(api=[], worker=[f"127.0.0.1:{port}"], interval_s=1)
        with prometheus(tmp_path / "prometheus", config) as prom:
            wait_for(lambda: len(query(prom, "miniml_gpu_utilization_ratio")) == 2, 30, "Prometheus to scrape the GPUs")
            results = {title: query(prom, expr) for title, expr in gpu_queries}
    finally:
        server.shutdown()
        thread.join(5)
    by_gpu = {r["metric"]["gpu"]: float(r["value"][1]) for r in results["GPU utilisation"]}
    assert by_gpu == pytest.approx({"0": 0.75, "1": 0.05})
    memory = {r["metric"]["gpu"]: float(r["value"][1]) for r in results["GPU memory used"]}
    assert memory == pytest.approx({"0": 0.25, "1": 0.1})
    assert all(r["metric"]["name"] == "NVIDIA H200" for r in results["GPU utilisation"])


def test_the_shipped_rules_and_config_pass_promtool() -> None:
    promtool = binary("promtool")
    rules = subprocess.run(
        [promtool, "check", "rules", str(ROOT / "deploy" / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"{sum(len(g['rules']) for g in alert_rules()['groups'])} rules found" in rules.stdout + rules.stderr


def test_the_deploy_files_are_generated_from_the_code() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
