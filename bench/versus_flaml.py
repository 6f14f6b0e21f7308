"""The platform against FLAML at the same wall budget, on the same rows, scored on the same held-out rows.

    .venv/bin/uv pip install flaml==2.7.0     # once; FLAML is not a dependency of miniml (the lock has its learners)
    .venv/bin/python -m bench.versus_flaml [--budget 60] [--datasets breast_cancer,wine,...]
    .venv/bin/python -m bench.versus_flaml --budget 120 --datasets large    # 2,000,000 rows

For each dataset the bench keeps 20 % of the rows apart (seeded). The platform gets the other 80 %
as an upload and a job with ``timeout_s`` = budget and its default families. FLAML gets the same
80 % and ``time_budget`` = budget, on the same number of cores. Both final models predict the
held-out rows. The bench prints, per dataset, the held-out score of each, the score ratio
(platform / FLAML; for RMSE, FLAML / platform, so above 1 means the platform did better), and the
wall-time ratio (platform submit to registered model / FLAML fit).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine, make_classification
from sklearn.metrics import f1_score, mean_squared_error
from sklearn.model_selection import train_test_split

from bench.signals import stop_on_sigterm
from bench.training import platform_settings
from miniml.processes import Supervisor, embedded_services
from miniml.sdk.client import Client
from miniml.tracking.access import use_admin_credentials
from miniml.tracking.signing import load_verified, signing_key


def _frame(loader: Callable[..., object], target: str = "target") -> tuple[pd.DataFrame, str, str]:
    ds = loader(as_frame=True)
    frame = ds.frame.copy()  # type: ignore[attr-defined]
    frame.columns = [str(c) for c in frame.columns]
    return frame, target, "classification"


def wide() -> tuple[pd.DataFrame, str, str]:
    x, y = make_classification(n_samples=3000, n_features=64, n_informative=12, n_classes=3, random_state=0)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(64)])
    frame["label"] = np.array(["a", "b", "c"])[y]
    return frame, "label", "classification"


def categorical_missing() -> tuple[pd.DataFrame, str, str]:
    rng = np.random.default_rng(0)
    n = 4000
    city = rng.choice(["Zürich", "São Paulo", "Kraków", "Ōsaka", "Lyon"], n)
    plan = rng.choice(["basic", "pro", "team"], n, p=[0.6, 0.3, 0.1])
    usage = rng.gamma(2.0, 10.0, n)
    tenure = rng.integers(1, 60, n).astype(float)
    score = 0.05 * usage - 0.03 * tenure + (plan == "basic") * 1.0 + (city == "Lyon") * 0.8 + rng.normal(0, 1, n)
    frame = pd.DataFrame({"city": city, "plan": plan, "usage": usage, "tenure": tenure})
    frame.loc[rng.random(n) < 0.1, "usage"] = np.nan
    frame.loc[rng.random(n) < 0.05, "city"] = None
    frame["churned"] = np.where(score > np.median(score), "yes", "no")
    return frame, "churned", "classification"


def large() -> tuple[pd.DataFrame, str, str]:
    """2,000,000 rows, 7 columns: the data-size fidelity case (run it with --budget 120)."""
    x, y = make_classification(n_samples=2_000_000, n_features=7, n_informative=5, random_state=0)
    frame = pd.DataFrame(x.astype("float32"), columns=[f"f{i}" for i in range(7)])
    frame["label"] = np.where(y == 1, "yes", "no")
    return frame, "label", "classification"


def regression() -> tuple[pd.DataFrame, str, str]:
    frame = load_diabetes(as_frame=True).frame
    return frame.rename(columns={"target": "progression"}), "progression", "regression"


DATASETS: dict[str, Callable[[], tuple[pd.DataFrame, str, str]]] = {
    "breast_cancer": lambda: _frame(load_breast_cancer),
    "wine": lambda: _frame(load_wine),
    "digits": lambda: _frame(load_digits),
    "wide": wide,
    "categorical_missing": categorical_missing,
    "diabetes_regression": regression,
}
EXTRA = {"large": large}  # not in the default list: minutes to upload and to train


def held_out_score(task: str, y: pd.Series, pred: np.ndarray) -> float:
    if task == "classification":
        return float(f1_score(y.astype(str), pd.Series(pred).astype(str), average="macro"))
    return float(math.sqrt(mean_squared_error(y, pred)))


def run_flaml(train: pd.DataFrame, target: str, task: str, budget: float, cores: int) -> tuple[object, float]:
    from flaml import AutoML

    automl = AutoML()
    started = time.perf_counter()
    automl.fit(
        X_train=train.drop(columns=target),
        y_train=train[target],
        task=task,
        metric="macro_f1" if task == "classification" else "rmse",
        time_budget=budget,
        n_jobs=cores,
        seed=0,
        verbose=0,
    )
    return automl, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=60)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--verbose", action="store_true", help="Print every job log line and trial, timed from submit.")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="miniml-vs-flaml-") as tmp:
        settings = platform_settings(Path(tmp) / "platform")
        sup = Supervisor(settings, embedded_services(settings))
        sup.start_all()
        try:
            use_admin_credentials(settings.mlflow.admin_password, settings.data_dir)  # to load the models
            key = (settings.data_dir / "admin.key").read_text().strip()
            client = Client(settings.api_url, api_key=key, timeout=120)
            client.projects.create("bench")
            for name in args.datasets.split(","):
                frame, target, task = (DATASETS | EXTRA)[name]()
                stratify = frame[target] if task == "classification" else None
                train, test = train_test_split(frame, test_size=0.2, random_state=0, stratify=stratify)
                dataset = name.replace("_", "-")
                path = Path(tmp) / f"{dataset}.csv"
                train.to_csv(path, index=False)
                client.datasets.upload("bench", path)
                submitted, submitted_wall = time.perf_counter(), time.time()
                job = client.jobs.create(
                    "bench",
                    dataset=dataset,
                    target=target,
                    task=task,
                    timeout_s=args.budget,
                    model_name=dataset,
                    seed=0,
                )
                done = client.jobs.wait("bench", job.id, timeout_s=args.budget * 4 + 300)
                platform_wall = time.perf_counter() - submitted
                trials = [t for t in done.leaderboard if t.finished_at]
                first_trial = min(t.finished_at.timestamp() - t.duration_s for t in trials) - submitted_wall
                configurations = [(t.family, tuple(sorted(t.params.items()))) for t in done.leaderboard]
                duplicates = len(configurations) - len(set(configurations))
                assert done.state == "succeeded", (
                    done.reason,
                    [line.message for line in client.jobs.logs("bench", job.id)],
                )
                for line in client.jobs.logs("bench", job.id):  # how the budget was spent
                    if args.verbose:
                        print(f"    {name} +{line.at.timestamp() - submitted_wall:6.1f}s {line.message[:220]}")
                        continue
                    if any(
                        k in line.message
                        for k in ("sample of", "best:", "would need", "final fit", "registered", "last rung")
                    ):
                        print(f"    {name}: {line.message[:200]}", flush=True)
                model, _signature = load_verified(
                    settings.mlflow_uri,
                    str(done.model_name),
                    str(done.model_version),
                    signing_key(settings.auth.model_signing_key, settings.data_dir),
                )
                platform_score = held_out_score(task, test[target], model.predict(test.drop(columns=target)))
                automl, flaml_wall = run_flaml(train, target, task, args.budget, cores)
                flaml_score = held_out_score(task, test[target], automl.predict(test.drop(columns=target)))  # type: ignore[attr-defined]
                print(f"    {name}: FLAML's best: {automl.best_estimator} {automl.best_config}", flush=True)  # type: ignore[attr-defined]
                if args.verbose:
                    for t in done.leaderboard:
                        ended = t.finished_at.timestamp() - submitted_wall if t.finished_at else float("nan")
                        print(
                            f"    {name} trial {t.number} {t.family} {t.state} score {t.score} "
                            f"{t.duration_s:.1f}s ended +{ended:.1f}s {t.error or ''}"
                        )
                best = max(trials, key=lambda t: t.score if t.score is not None else -math.inf)
                print(f"    {name}: miniml's best: {best.family} {best.params}", flush=True)
                ratio = platform_score / flaml_score if task == "classification" else flaml_score / platform_score
                rows.append(
                    (name, task, platform_score, flaml_score, ratio, platform_wall, flaml_wall, first_trial, duplicates)
                )
                print(
                    f"{name:22s} {'f1_macro' if task == 'classification' else 'rmse':8s} miniml {platform_score:9.4f}  "
                    f"FLAML {flaml_score:9.4f}  score ratio {ratio:6.4f}  wall: miniml {platform_wall:6.1f}s "
                    f"FLAML {flaml_wall:6.1f}s  ratio {platform_wall / flaml_wall:5.2f}  "
                    f"trials {len(configurations)} (duplicates {duplicates}), first trial {first_trial:.2f}s after submit",
                    flush=True,
                )
        finally:
            sup.stop_all()
    print(f"budget {args.budget:.0f}s each, {cores} cores; score ratio above 1: miniml did better on held-out rows")
    print(
        f"score ratio: min {min(r[4] for r in rows):.4f}, geometric mean {math.exp(np.mean([math.log(r[4]) for r in rows])):.4f}"
    )
    print(f"wall ratio (submit to registered / FLAML fit): max {max(r[5] / r[6] for r in rows):.2f}")
    print(
        f"submit to registered, over the budget: max {max(r[5] for r in rows) - args.budget:+.1f}s; "
        f"submit to first trial: max {max(r[7] for r in rows):.2f}s; duplicate configurations: {sum(r[8] for r in rows)}"
    )


if __name__ == "__main__":
    stop_on_sigterm()
    main()
