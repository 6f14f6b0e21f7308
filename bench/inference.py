"""Serving benchmark: `mlflow models serve` against miniml's inference service, same models, same load.

    .venv/bin/python bench/inference.py [--seconds 5]

Registers an iris LogisticRegression and a 100-tree RandomForest in a fresh MLflow server,
serves each with `mlflow models serve --env-manager local` and through a miniml deployment,
and drives both with `wrk` (Debian package `wrk`; installed if missing and root) on loopback at
concurrency 1, 8 and 32 with one-row requests, then 1,000-row requests. Prints requests/s,
p50/p99 and the ratios, and rows/s against in-process `predict`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pandas as pd
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from bench.signals import stop_on_sigterm
from miniml.config import Settings
from miniml.processes import Supervisor, child_env, embedded_services
from miniml.tracking.runs import Tracker
from miniml.training.data import features_from_profile
from miniml.training.families import FAMILIES
from miniml.training.search import build_pipeline

IRIS = Path(__file__).resolve().parents[1] / "data" / "samples" / "iris.csv"
ROW = {"sepal_length": 5.9, "sepal_width": 3.0, "petal_length": 5.1, "petal_width": 1.8}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        sys.exit("bench/inference needs wrk: apt-get install wrk")
    return found


def register(tracker: Tracker, name: str, estimator: object) -> tuple[str, object, pd.DataFrame]:
    frame = pd.read_csv(IRIS)
    profile = {
        "columns": [{"name": c, "kind": "numeric"} for c in frame.columns[:-1]]
        + [{"name": "target", "kind": "categorical"}]
    }
    features = features_from_profile(profile, "target")
    family = FAMILIES["random_forest" if isinstance(estimator, RandomForestClassifier) else "linear"]
    pipe = build_pipeline(features, family, estimator).fit(frame[features.columns], frame["target"])
    run = tracker.start_job_run("bench", 1, {})
    version = tracker.log_model(
        run, pipe, family, frame[features.columns].head(3), registered=f"bench.{name}", params={}, metrics={}
    )
    return version, pipe, frame[features.columns]


def wrk(
    binary: str, url: str, body: dict[str, object], headers: dict[str, str], conns: int, seconds: int, tmp: Path
) -> dict[str, float]:
    script = tmp / "post.lua"
    lines = [
        'wrk.method = "POST"',
        f"wrk.body = {json.dumps(json.dumps(body))}",
        'wrk.headers["Content-Type"] = "application/json"',
    ]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    lines += [
        "done = function(summary, latency, requests)",
        '  io.write(string.format("P50 %f\\nP99 %f\\nERRS %d\\n", latency:percentile(50), latency:percentile(99),'
        " summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))",
        "end",
    ]
    script.write_text("\n".join(lines))
    out = subprocess.run(
        [
            binary,
            "-t",
            "1" if conns == 1 else "2",
            "-c",
            str(conns),
            "-d",
            f"{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = float(re.search(r"P50 ([\d.]+)", out).group(1)) / 1000  # type: ignore[union-attr]
    p99 = float(re.search(r"P99 ([\d.]+)", out).group(1)) / 1000  # type: ignore[union-attr]
    errors = int(re.search(r"ERRS (\d+)", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors}


def wait_http(url: str, timeout: float = 120, method: str = "GET", **kwargs: object) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.request(method, url, timeout=5, **kwargs).status_code == 200:  # type: ignore[arg-type]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} never answered")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="miniml inference processes (one per core)")
    args = parser.parse_args()
    binary = ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="miniml-bench-") as tmpdir:
        tmp = Path(tmpdir)
        settings = Settings(
            data_dir=tmp / "platform",
            api={"port": free_port()},
            mlflow={"port": free_port()},
            prefect={"port": free_port()},
            inference={"port": free_port(), "workers": args.workers},
        )
        services = [s for s in embedded_services(settings) if s.name in ("mlflow", "api", "inference")]
        sup = Supervisor(settings, services)
        procs: list[subprocess.Popen[bytes]] = []
        results: dict[tuple[str, str, int], dict[str, float]] = {}
        try:
            sup.start_all()
            tracker = Tracker(settings.mlflow_uri)
            models = {
                "lr": register(tracker, "lr", LogisticRegression(max_iter=500)),
                "rf": register(tracker, "rf", RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)),
            }
            key = (settings.data_dir / "admin.key").read_text().strip()
            headers = {"X-API-Key": key}
            httpx.post(
                f"{settings.api_url}/api/v1/projects", json={"name": "bench"}, headers=headers
            ).raise_for_status()
            for name in models:
                body = {"name": f"bench-{name}", "model_name": name, "target": 1}
                httpx.post(
                    f"{settings.api_url}/api/v1/projects/bench/deployments", json=body, headers=headers, timeout=30
                ).raise_for_status()
            env = child_env(settings) | {"MLFLOW_TRACKING_URI": settings.mlflow_uri}
            mlflow_urls = {}
            for name in models:
                port = free_port()
                procs.append(
                    subprocess.Popen(
                        [
                            str(Path(sys.executable).parent / "mlflow"),
                            "models",
                            "serve",
                            "-m",
                            f"models:/bench.{name}/1",
                            "-p",
                            str(port),
                            "--env-manager",
                            "local",
                            "--host",
                            "127.0.0.1",
                        ],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
                mlflow_urls[name] = f"http://127.0.0.1:{port}/invocations"
            for name in models:
                wait_http(mlflow_urls[name], method="POST", json={"dataframe_records": [ROW]})
                wait_http(
                    f"{settings.inference_url}/v1/endpoints/bench-{name}/predict",
                    method="POST",
                    json={"rows": [ROW]},
                    headers=headers,
                )
            many = (
                pd.read_csv(IRIS)
                .drop(columns=["target"])
                .sample(1000, replace=True, random_state=0)
                .to_dict(orient="records")
            )
            for name in models:
                for conns in (1, 8, 32):
                    results[("mlflow", name, conns)] = wrk(
                        binary, mlflow_urls[name], {"dataframe_records": [ROW]}, {}, conns, args.seconds, tmp
                    )
                    results[("miniml", name, conns)] = wrk(
                        binary,
                        f"{settings.inference_url}/v1/endpoints/bench-{name}/predict",
                        {"rows": [ROW]},
                        headers,
                        conns,
                        args.seconds,
                        tmp,
                    )
                results[("mlflow", name, 1000)] = wrk(
                    binary, mlflow_urls[name], {"dataframe_records": many}, {}, 2, args.seconds, tmp
                )
                results[("miniml", name, 1000)] = wrk(
                    binary,
                    f"{settings.inference_url}/v1/endpoints/bench-{name}/predict",
                    {"rows": many},
                    headers,
                    2,
                    args.seconds,
                    tmp,
                )
        finally:
            for proc in procs:
                os.killpg(proc.pid, signal.SIGTERM)
            sup.stop_all()
        frame = pd.DataFrame(many)
        inproc = {}
        for name, (_v, pipe, _x) in models.items():
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 2:
                pipe.predict(frame)  # type: ignore[attr-defined]
                n += 1
            inproc[name] = 1000 * n / (time.perf_counter() - start)
    print(
        f"{'model':6} {'conc':>5} | {'mlflow req/s':>12} {'p50 ms':>8} {'p99 ms':>8} | {'miniml req/s':>12} {'p50 ms':>8} {'p99 ms':>8} | {'rps x':>6} {'p99 /':>6}"
    )
    for name in ("lr", "rf"):
        for conns in (1, 8, 32):
            a, b = results[("mlflow", name, conns)], results[("miniml", name, conns)]
            print(
                f"{name:6} {conns:>5} | {a['rps']:12.1f} {a['p50_ms']:8.1f} {a['p99_ms']:8.1f} | {b['rps']:12.1f} {b['p50_ms']:8.1f} {b['p99_ms']:8.1f} |"
                f" {b['rps'] / a['rps']:6.1f} {a['p99_ms'] / max(b['p99_ms'], 1e-6):6.1f}"
            )
    for name in ("lr", "rf"):
        a, b = results[("mlflow", name, 1000)], results[("miniml", name, 1000)]
        print(
            f"{name}: 1,000-row requests: mlflow {a['rps'] * 1000:,.0f} rows/s, miniml {b['rps'] * 1000:,.0f} rows/s, "
            f"in-process predict {inproc[name]:,.0f} rows/s -> miniml/in-process {b['rps'] * 1000 / inproc[name]:.2f}"
        )
    errors = {k: v["errors"] for k, v in results.items() if v["errors"]}
    print(f"non-2xx or socket errors: {errors or 'none'}; miniml inference workers: {args.workers}; mlflow: 1 worker")


if __name__ == "__main__":
    stop_on_sigterm()
    main()
