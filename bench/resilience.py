"""Resilience benchmark: failed predictions per 10,000 under steady load, undisturbed and disturbed.

    .venv/bin/python bench/resilience.py [--seconds 40] [--threads 4]

Starts `miniml up` in a temp folder on free ports, trains three versions of one model (two on
iris, one on iris with an extra column), deploys version 1, and drives steady predictions from
`--threads` threads. Phase 1 runs undisturbed; phase 2, the same length at the same load, swaps
versions 1 → 2 → 1, tries a rollout of the incompatible version 3 (refused), and kills the worker
and MLflow (SIGKILL; `miniml up` restarts them). Prints both failure rates and the disturbed
phase's throughput as a ratio of the undisturbed one's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from sklearn.datasets import load_iris

from bench.signals import stop_on_sigterm
from miniml.sdk.client import Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Load:
    def __init__(self, url: str, key: str, threads: int) -> None:
        self.url, self.key = url, key
        self.ok = 0
        self.failed: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(threads)]

    def run(self) -> None:
        row = {"sepal length (cm)": 5.1, "sepal width (cm)": 3.5, "petal length (cm)": 1.4, "petal width (cm)": 0.2}
        with httpx.Client(headers={"X-API-Key": self.key}, timeout=30) as http:
            while not self.stop.is_set():
                try:
                    r = http.post(self.url, json={"rows": [row]})
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failed.append(f"{r.status_code} {r.text[:120]}")
                except httpx.HTTPError as exc:
                    self.failed.append(type(exc).__name__)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def children(data: Path) -> dict[str, dict[str, object]]:
    return {c["name"]: c for c in json.loads((data / "up.json").read_text())["children"]}


def kill_and_wait(data: Path, name: str) -> float:
    before = children(data)[name]
    started = time.monotonic()
    os.kill(int(before["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    while True:
        now = children(data)[name]
        if int(now["restarts"]) > int(before["restarts"]) and now["state"] == "running":  # type: ignore[call-overload]
            return time.monotonic() - started
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="miniml-bench-res-"))
    data = tmp / "data"
    ports = {n: free_port() for n in ("api", "mlflow", "prefect", "inference", "prometheus", "worker")}
    env = os.environ | {
        "MINIML_DATA_DIR": str(data),
        "MINIML_API__PORT": str(ports["api"]),
        "MINIML_MLFLOW__PORT": str(ports["mlflow"]),
        "MINIML_PREFECT__PORT": str(ports["prefect"]),
        "MINIML_INFERENCE__PORT": str(ports["inference"]),
        "MINIML_MONITORING__PROMETHEUS_PORT": str(ports["prometheus"]),
        "MINIML_WORKER__METRICS_PORT": str(ports["worker"]),
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "miniml", "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "Press Ctrl-C" in line:
                break
        key = (data / "admin.key").read_text().strip()
        api = f"http://127.0.0.1:{ports['api']}"
        client = Client(api, api_key=key, timeout=60)
        client.projects.create("bench")
        frame = load_iris(as_frame=True).frame
        frame.to_csv(tmp / "iris.csv", index=False)
        wide = frame.assign(extra=frame["petal length (cm)"] * 2)
        wide.to_csv(tmp / "wide.csv", index=False)
        client.datasets.upload("bench", tmp / "iris.csv")
        client.datasets.upload("bench", tmp / "wide.csv")
        for dataset, family in (("iris", "linear"), ("iris", "random_forest"), ("wide", "linear")):
            job = client.jobs.create(
                "bench", dataset=dataset, target="target", families=[family], max_trials=2, model_name="iris"
            )
            assert client.jobs.wait("bench", job.id, timeout_s=600).state == "succeeded"
        client.deployments.create("bench", "flowers", "iris", target=1)
        client.deployments.wait_ready("bench", "flowers")
        url = f"http://127.0.0.1:{ports['inference']}/v1/endpoints/flowers/predict"

        with Load(url, key, args.threads) as calm:
            time.sleep(args.seconds)
        events: list[str] = []
        with Load(url, key, args.threads) as rough:
            began = time.monotonic()
            for target in (2, 1):
                client.deployments.update("bench", "flowers", target=target)
                client.deployments.wait_ready("bench", "flowers")
                events.append(f"swap to {target}")
            refused = httpx.patch(
                f"{api}/api/v1/projects/bench/deployments/flowers", json={"target": 3}, headers={"X-API-Key": key}
            )
            events.append(f"rollout of v3 refused: {refused.status_code}")
            for name in ("worker", "mlflow"):
                events.append(f"{name} killed, back in {kill_and_wait(data, name):.1f}s")
            time.sleep(max(0.0, args.seconds - (time.monotonic() - began)))
        for label, load in (("undisturbed", calm), ("disturbed", rough)):
            total = load.ok + len(load.failed)
            rate = 10_000 * len(load.failed) / max(1, total)
            print(f"{label:12s} {total:7d} requests, {len(load.failed)} failed = {rate:.1f} per 10,000")
            if load.failed:
                print("   e.g.", sorted(set(load.failed))[:3])
        print("events:", "; ".join(events))
        ratio = (10_000 * len(rough.failed) / max(1, rough.ok + len(rough.failed))) - (
            10_000 * len(calm.failed) / max(1, calm.ok + len(calm.failed))
        )
        print(f"failed per 10,000, disturbed minus undisturbed: {ratio:.1f} (target 0)")
        print(f"throughput disturbed / undisturbed: {rough.ok / max(1, calm.ok):.2f}x")
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=90)
        restarts = re.findall(r"miniml: (\w+) exited \(([^)]*)\)", out)
        print("up saw:", restarts)


if __name__ == "__main__":
    stop_on_sigterm()
    main()
