"""Start latency: submit -> the job's flow run running -> its first trial started, on an idle worker.

    .venv/bin/python -m bench.start_latency [--jobs 4]

Starts the whole platform (`miniml up`'s processes) in a temp folder on free ports, uploads iris,
and submits small jobs one after another (each once the last has ended and the worker is idle
again). Prints, per job, submit -> running (the worker's flow run claimed it) and submit -> first
trial started (from the leaderboard), and their ratio to the job's whole wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sklearn.datasets import load_iris

from bench.signals import stop_on_sigterm
from bench.training import platform_settings
from miniml.processes import Supervisor, embedded_services
from miniml.sdk.client import Client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--verbose", action="store_true", help="Print each job's log lines, timed from submit.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="miniml-latency-") as tmp:
        settings = platform_settings(Path(tmp) / "platform")
        sup = Supervisor(settings, embedded_services(settings))
        sup.start_all()
        try:
            client = Client(settings.api_url, api_key=(settings.data_dir / "admin.key").read_text().strip(), timeout=60)
            client.projects.create("latency")
            data = Path(tmp) / "iris.csv"
            load_iris(as_frame=True).frame.to_csv(data, index=False)
            client.datasets.upload("latency", data)
            firsts = []
            for i in range(args.jobs):
                time.sleep(3)  # the worker idle again
                submitted = time.time()
                job = client.jobs.create(
                    "latency", dataset="iris", target="target", max_trials=2, families=["linear"], seed=i
                )
                done = client.jobs.wait("latency", job.id, timeout_s=300)
                total = time.time() - submitted
                first = min(t.finished_at.timestamp() - t.duration_s for t in done.leaderboard if t.finished_at)
                running = done.started_at.timestamp() - submitted if done.started_at else float("nan")
                firsts.append(first - submitted)
                if args.verbose:
                    for line in client.jobs.logs("latency", job.id):
                        print(f"    +{line.at.timestamp() - submitted:5.2f}s {line.message[:160]}")
                print(
                    f"job {job.id}: submit -> running {running:.2f} s, -> first trial started {first - submitted:.2f} s, "
                    f"-> {done.state} {total:.2f} s (first trial at {(first - submitted) / total:.0%} of the job)",
                    flush=True,
                )
        finally:
            sup.stop_all()
    print(f"submit -> first trial started: max {max(firsts):.2f} s, min {min(firsts):.2f} s over {len(firsts)} jobs")


if __name__ == "__main__":
    stop_on_sigterm()
    main()
