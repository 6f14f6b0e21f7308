"""Upload benchmark: a generated CSV through the HTTP api, against a plain copy, in one run.

    .venv/bin/python bench/upload.py [--size-mb 1024] [--stores local,s3]

For each store (the local folder, and S3 on moto's server), starts the api as its own process in
a temp folder on a free port and uploads the same generated CSV through `POST …/datasets` (the
SDK streams it as multipart). The baseline, measured in the same run on the same file, is what a
user would do without the platform: a plain file copy for the local store, a direct boto3
`upload_file` for S3. The api's upload does more than the baseline (hash, schema and profile of
every row, the metadata row), so the ratio says what that costs. Prints throughput ratios and the
api process's peak RSS (VmHWM), which must stay flat however large the file, and how long a small
request (list datasets) takes while the upload runs, against the same request on the idle api.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import boto3
import httpx
import numpy as np
import pandas as pd

from bench.signals import stop_on_sigterm
from miniml.config import Settings
from miniml.processes import Supervisor, embedded_services
from miniml.sdk.client import Client

S3_ENV = {
    "MINIML_STORAGE__KIND": "s3",
    "MINIML_STORAGE__BUCKET": "bench",
    "MINIML_STORAGE__ACCESS_KEY_ID": "bench-access",
    "MINIML_STORAGE__SECRET_ACCESS_KEY": "bench-secret",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_csv(path: Path, size_mb: int) -> int:
    """A CSV of about size_mb MiB: numeric, integer, categorical and boolean columns, random values.

    Blocks of 100,000 fresh rows each, so the profile sees real spread, not one block repeated.
    """
    rng = np.random.default_rng(0)
    target = size_mb << 20
    with path.open("w", encoding="utf-8") as fh:
        header = True
        while fh.tell() < target - (12 << 20):  # a block is about 11 MiB: stop just under the size
            n = 100_000
            block = pd.DataFrame(
                {f"x{i}": rng.normal(i, 1 + i, n).round(4) for i in range(6)}
                | {
                    "count": rng.integers(0, 1000, n),
                    "city": rng.choice(["berlin", "lisbon", "oslo", "rome", "paris", "vienna"], n),
                    "flag": rng.random(n) < 0.3,
                    "label": rng.choice(["a", "b", "c"], n),
                }
            )
            block.to_csv(fh, index=False, header=header)
            header = False
    return path.stat().st_size


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far; this process's own when pid is None."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Probe:
    """Times a small authenticated request (list the project's datasets) every 50 ms, on a thread."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"X-API-Key": self.key}, timeout=60) as http:
            while not self._stop.is_set():
                start = time.perf_counter()
                http.get("/api/v1/projects/bench/datasets").raise_for_status()
                self.seconds.append(time.perf_counter() - start)
                self._stop.wait(0.05)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def ms(self, q: float) -> float:
        return 1000 * statistics.quantiles(self.seconds, n=100, method="inclusive")[int(q * 100) - 1]


def drop_cache(path: Path) -> None:
    """Read the file once so both runs start from the page cache (the same starting point)."""
    with path.open("rb") as fh:
        while fh.read(16 << 20):
            pass


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("moto's server did not start")


def run_store(
    kind: str, csv: Path, tmp: Path, moto: subprocess.Popen[bytes] | None, moto_url: str | None
) -> dict[str, float]:
    size = csv.stat().st_size
    env_before = dict(os.environ)
    if kind == "s3":
        assert moto_url
        os.environ.update(S3_ENV | {"MINIML_STORAGE__ENDPOINT_URL": moto_url})
    # Room for the whole file whatever --size-mb says (the default limit is 1 GiB).
    limit = max(size + (64 << 20), 1 << 30)
    os.environ["MINIML_API__MAX_UPLOAD_BYTES"] = str(limit)
    settings = Settings(data_dir=tmp / f"platform-{kind}", api={"port": free_port(), "max_upload_bytes": limit})
    sup = Supervisor(settings, [s for s in embedded_services(settings) if s.name == "api"])
    try:
        sup.start_all()
        pid = sup.procs["api"].pid
        rss_idle = peak_rss_mb(pid)
        key = (settings.data_dir / "admin.key").read_text().strip()
        client = Client(settings.api_url, api_key=key)
        client.projects.create("bench")

        moto_pid = moto.pid if moto is not None and kind == "s3" else None
        drop_cache(csv)
        cpu_before = cpu_s(None), cpu_s(moto_pid) if moto_pid else 0.0
        start = time.perf_counter()
        if kind == "local":
            shutil.copyfile(csv, tmp / "copy.csv")
        else:
            s3 = boto3.client(
                "s3",
                endpoint_url=moto_url,
                aws_access_key_id=S3_ENV["MINIML_STORAGE__ACCESS_KEY_ID"],
                aws_secret_access_key=S3_ENV["MINIML_STORAGE__SECRET_ACCESS_KEY"],
                region_name="us-east-1",
            )
            s3.create_bucket(Bucket="baseline")
            s3.upload_file(str(csv), "baseline", "copy.csv")
        baseline_s = time.perf_counter() - start
        baseline_cpu = cpu_s(None) - cpu_before[0], (cpu_s(moto_pid) - cpu_before[1]) if moto_pid else 0.0
        (tmp / "copy.csv").unlink(missing_ok=True)

        with Probe(settings.api_url, key) as idle:
            time.sleep(2)
        drop_cache(csv)
        cpu_before = cpu_s(None), cpu_s(moto_pid) if moto_pid else 0.0
        api_cpu_before = cpu_s(pid)
        start = time.perf_counter()
        with Probe(settings.api_url, key) as busy:
            version = client.datasets.upload("bench", csv, name="big")
        api_s = time.perf_counter() - start
        api_cpu = (
            cpu_s(None) - cpu_before[0],
            cpu_s(pid) - api_cpu_before,
            (cpu_s(moto_pid) - cpu_before[1]) if moto_pid else 0.0,
        )
        assert version.size_bytes == size and version.rows > 0, version
        rss_peak = peak_rss_mb(pid)
        if kind == "s3":
            s3.delete_object(Bucket="baseline", Key="copy.csv")
    finally:
        sup.stop_all()
        os.environ.clear()
        os.environ.update(env_before)
    mib = size / (1 << 20)
    return {
        "baseline_mib_s": mib / baseline_s,
        "api_mib_s": mib / api_s,
        "ratio": baseline_s / api_s,
        "rss_idle_mb": rss_idle,
        "rss_peak_mb": rss_peak,
        "rows": float(version.rows),
        "baseline_cpu_client": baseline_cpu[0],
        "baseline_cpu_moto": baseline_cpu[1],
        "api_cpu_client": api_cpu[0],
        "api_cpu_api": api_cpu[1],
        "api_cpu_moto": api_cpu[2],
        "baseline_s": baseline_s,
        "api_s": api_s,
        "idle_p50_ms": idle.ms(0.5),
        "busy_p50_ms": busy.ms(0.5),
        "busy_p95_ms": busy.ms(0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--stores", default="local,s3")
    parser.add_argument("--keep", action="store_true", help="keep the generated CSV in the temp folder for reruns")
    args = parser.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    csv = Path(tempfile.gettempdir()) / f"miniml-bench-upload-{args.size_mb}mb.csv"
    if not csv.exists():
        start = time.perf_counter()
        make_csv(csv, args.size_mb)
        print(f"generated {csv} in {time.perf_counter() - start:.0f}s", flush=True)
    print(f"uploading {csv.stat().st_size / (1 << 20):.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory(prefix="miniml-bench-upload-") as tmpdir:
        tmp = Path(tmpdir)
        moto, moto_url = start_moto() if "s3" in stores else (None, None)
        try:
            results = {kind: run_store(kind, csv, tmp, moto, moto_url) for kind in stores}
        finally:
            if moto is not None:
                os.killpg(moto.pid, signal.SIGTERM)
                moto.wait(10)
            if not args.keep:
                csv.unlink()
    baseline_name = {"local": "file copy", "s3": "boto3 upload_file"}
    print(f"\n{'store':6} {'baseline':>20} {'MiB/s':>8} {'api MiB/s':>10} {'ratio':>6} {'rss idle':>9} {'rss peak':>9}")
    for kind, r in results.items():
        print(
            f"{kind:6} {baseline_name[kind]:>20} {r['baseline_mib_s']:8.0f} {r['api_mib_s']:10.0f} "
            f"{r['ratio']:5.2f}x {r['rss_idle_mb']:7.0f}MB {r['rss_peak_mb']:7.0f}MB"
        )
    print("\nCPU seconds used (this machine's cores are shared by the client, the api and moto's server):")
    for kind, r in results.items():
        moto_base = f" + moto {r['baseline_cpu_moto']:.1f}" if kind == "s3" else ""
        moto_api = f" + moto {r['api_cpu_moto']:.1f}" if kind == "s3" else ""
        print(
            f"{kind:6} baseline {r['baseline_s']:.1f}s wall: client {r['baseline_cpu_client']:.1f}{moto_base} | "
            f"api {r['api_s']:.1f}s wall: client {r['api_cpu_client']:.1f} + api {r['api_cpu_api']:.1f}{moto_api}"
        )
    print("\nA small request (list datasets, every 50 ms) while the upload runs, against the idle api:")
    for kind, r in results.items():
        print(
            f"{kind:6} idle p50 {r['idle_p50_ms']:.1f} ms | during the upload p50 {r['busy_p50_ms']:.1f} ms "
            f"({r['busy_p50_ms'] / r['idle_p50_ms']:.1f}x), p95 {r['busy_p95_ms']:.1f} ms"
        )
    print("\ntargets: ratio >= 0.5x, peak RSS < 250 MB")


if __name__ == "__main__":
    stop_on_sigterm()
    main()
