"""Training benchmark: the same Optuna search through the platform and as a plain script, in one run.

    .venv/bin/python bench/training.py [--trials 24] [--rows 4000]

Starts the whole platform (`miniml up` processes) in a temp folder on free ports, uploads a
synthetic classification dataset, runs a job, and runs the identical search (families, trials,
data split, seed, CV folds, threads) in-process with Optuna's in-memory storage. Prints the
wall-time ratios and the best-score difference.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from sklearn.datasets import make_classification

from bench.signals import stop_on_sigterm
from miniml.config import Settings
from miniml.data.formats import detect
from miniml.data.profiles import profile_table
from miniml.domain.tasks import Task
from miniml.processes import Supervisor, embedded_services
from miniml.sdk.client import Client
from miniml.training.data import features_from_profile, load_frame, split
from miniml.training.search import SearchControl, SearchSpec, best_trial, holdout_metrics, new_study, refit, run_search

FAMILIES = ["linear", "random_forest", "hist_gradient_boosting", "lightgbm", "xgboost"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def platform_settings(folder: Path) -> Settings:
    """A whole platform (``miniml up``'s processes) in ``folder``, on free ports."""
    return Settings(
        data_dir=folder,
        api={"port": free_port()},
        mlflow={"port": free_port()},
        prefect={"port": free_port()},
        inference={"port": free_port()},
    )


def make_data(path: Path, rows: int) -> None:
    x, y = make_classification(n_samples=rows, n_features=16, n_informative=8, n_classes=3, random_state=0)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    frame["label"] = np.array(["alpha", "beta", "gamma"])[y]
    frame.to_csv(path, index=False)


def plain_search(path: Path, trials: int, threads: int) -> tuple[float, float, list]:
    """The search as a user would write it by hand: Optuna in memory, no platform."""
    start = time.perf_counter()
    table = detect(path)
    profile = profile_table(table)
    features = features_from_profile(profile, "label")
    data = split(load_frame(table), features, "label", Task.classification, test_size=0.2, seed=0)
    spec = SearchSpec(
        task=Task.classification, metric="f1_macro", families=FAMILIES, cv_folds=3, seed=0, n_jobs=threads
    )
    lock, claimed = threading.Lock(), [0]

    def claim() -> bool:
        with lock:
            claimed[0] += 1
            return claimed[0] <= trials

    storage = optuna.storages.InMemoryStorage()
    results: list = []
    run_search(storage, "plain", data, features, spec, SearchControl(claim=claim, on_trial=results.append))
    best = best_trial(new_study(storage, "plain", spec))
    assert best is not None
    pipe, _ = refit(best, data, features, spec)
    holdout_metrics(pipe, data, Task.classification)
    return time.perf_counter() - start, float(best.value or 0.0), results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="miniml-bench-") as tmp:
        data = Path(tmp) / "synthetic.csv"
        make_data(data, args.rows)
        import os

        os.environ["MINIML_WORKER__TRIAL_THREADS"] = str(args.threads)
        settings = platform_settings(Path(tmp) / "platform")
        sup = Supervisor(settings, embedded_services(settings))
        try:
            sup.start_all()
            client = Client(settings.api_url, api_key=(settings.data_dir / "admin.key").read_text().strip(), timeout=60)
            client.projects.create("bench")
            client.datasets.upload("bench", data)
            submitted, submitted_wall = time.perf_counter(), time.time()
            job = client.jobs.create(
                "bench",
                dataset="synthetic",
                target="label",
                max_trials=args.trials,
                families=FAMILIES,
                cv_folds=3,
                seed=0,
                test_size=0.2,
            )
            first_trial = None
            while True:
                current = client.jobs.get("bench", job.id)
                if first_trial is None and current.progress.trials_done >= 1:
                    first_trial = time.perf_counter() - submitted
                if current.state.terminal:
                    break
                time.sleep(0.2)
            platform_total = time.perf_counter() - submitted
            assert current.state == "succeeded", current.reason
            trials = current.leaderboard
            search_start = min(t.finished_at.timestamp() - t.duration_s for t in trials if t.finished_at)
            first_start = search_start - submitted_wall
            search_end = max(t.finished_at.timestamp() for t in trials if t.finished_at)
            platform_search = search_end - search_start
            platform_best = float(current.progress.best_score or 0.0)
            to_running = (
                (current.started_at - current.created_at).total_seconds() if current.started_at else float("nan")
            )
        finally:
            sup.stop_all()
        plain_total, plain_best, plain_trials = plain_search(data, args.trials, args.threads)
    print(
        f"data: {args.rows} rows x 16 features, 3 classes; {args.trials} trials; families {', '.join(FAMILIES)}; {args.threads} threads"
    )
    print(f"plain Optuna script (search + refit):          {plain_total:7.2f} s   best CV f1_macro {plain_best:.4f}")
    print(
        f"platform, search phase (first to last trial):  {platform_search:7.2f} s   ratio {platform_search / plain_total:.2f}"
    )
    print(
        f"platform, submit to succeeded (registered):    {platform_total:7.2f} s   ratio {platform_total / plain_total:.2f}"
    )
    print(f"platform best CV f1_macro {platform_best:.4f}  (difference {platform_best - plain_best:+.4f})")
    from collections import Counter

    def mix(items: list) -> str:
        by = Counter(t.family for t in items)
        return ", ".join(f"{f} {n}" for f, n in sorted(by.items()))

    print(f"trial time summed: plain {sum(t.duration_s for t in plain_trials):.1f} s ({mix(plain_trials)})")
    print(f"                   platform {sum(t.duration_s for t in trials):.1f} s ({mix(trials)})")
    print(
        f"submit to running: {to_running:.2f} s; submit to first trial started: {first_start:.2f} s, "
        f"done: {first_trial:.2f} s"
    )


if __name__ == "__main__":
    stop_on_sigterm()
    main()
