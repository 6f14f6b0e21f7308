"""Pure ML: each family, task detection, preprocessing, and models that load back from MLflow."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes

from miniml.data.formats import detect
from miniml.data.profiles import profile_table
from miniml.domain.tasks import Task, detect_task
from miniml.tracking.runs import Tracker
from miniml.tracking.signing import load_verified
from miniml.training.data import Features, coerce, features_from_profile, load_frame, split
from miniml.training.families import FAMILIES
from miniml.training.search import (
    SearchControl,
    SearchSpec,
    TrialResult,
    best_trial,
    holdout_metrics,
    make_storage,
    new_study,
    refit,
    run_search,
)

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"


def prepare(path: Path, target: str, task: Task | None = None):  # type: ignore[no-untyped-def]
    table = detect(path)
    profile = profile_table(table)
    col = next(c for c in profile["columns"] if c["name"] == target)
    task = task or detect_task(col, profile["rows"])
    features = features_from_profile(profile, target)
    data = split(load_frame(table), features, target, task, test_size=0.25, seed=0)
    return data, features, task


def search(
    tmp_path: Path, data, features: Features, task: Task, families: list[str], trials: int, metric: str | None = None
):  # type: ignore[no-untyped-def]
    lock = threading.Lock()
    claimed = [0]
    results: list[TrialResult] = []

    def claim() -> bool:
        with lock:
            if claimed[0] >= trials:
                return False
            claimed[0] += 1
            return True

    spec = SearchSpec(
        task=task,
        metric=metric or ("f1_macro" if task is Task.classification else "rmse"),
        families=families,
        n_jobs=2,
        cv_folds=3,
    )
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    run_search(storage, "s", data, features, spec, SearchControl(claim=claim, on_trial=results.append))
    study = new_study(storage, "s", spec)
    return study, spec, results


def write_csv(tmp_path: Path, frame: pd.DataFrame, name: str) -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def diabetes_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = load_diabetes(as_frame=True)
    frame = ds.frame.rename(columns={"target": "progression"})
    return write_csv(tmp_path_factory.mktemp("d"), frame, "diabetes.csv")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_each_family_trains_and_loads_back_from_mlflow(
    family: str, task: str, tmp_path: Path, diabetes_csv: Path, mlflow_uri: str
) -> None:
    if task == "classification":
        data, features, t = prepare(IRIS, "target")
    else:
        data, features, t = prepare(diabetes_csv, "progression")
    study, spec, results = search(tmp_path, data, features, t, [family], trials=2)
    assert len(results) == 2 and {r.family for r in results} == {family}
    best = best_trial(study)
    assert best is not None, [r.error for r in results]
    pipe, fam = refit(best, data, features, spec)
    metrics = holdout_metrics(pipe, data, t)
    if t is Task.classification:
        assert metrics["accuracy"] > 0.6
    else:
        baseline = math.sqrt(np.mean((data.y_test - data.y_train.mean()) ** 2))
        assert metrics["rmse"] < baseline * 1.05
    tracker = Tracker(mlflow_uri)
    run = tracker.start_job_run("fam", 1, {})
    name = f"fam.{family}-{task}"
    key = b"k" * 32
    version = tracker.log_model(
        run, pipe, fam, data.x_test.head(3), registered=name, params=best.params, metrics=metrics, signing_key=key
    )
    # Every family round-trips through the signed path the inference service takes.
    loaded, signature = load_verified(mlflow_uri, name, version, key)
    assert signature is not None and list(signature.inputs.input_names()) == list(data.x_test.columns)
    assert list(loaded.predict(data.x_test.head(3))) == list(pipe.predict(data.x_test.head(3)))


def test_iris_keeps_string_labels_and_scores_well(tmp_path: Path) -> None:
    data, features, task = prepare(IRIS, "target")
    assert task is Task.classification
    study, spec, _ = search(
        tmp_path, data, features, task, ["linear", "random_forest", "hist_gradient_boosting"], trials=6
    )
    pipe, _ = refit(best_trial(study), data, features, spec)  # type: ignore[arg-type]
    assert holdout_metrics(pipe, data, task)["f1_macro"] >= 0.9
    assert set(pipe.predict(data.x_test)) <= {"Iris-setosa", "Iris-versicolor", "Iris-virginica"}


def test_regression_beats_the_mean_predictor(tmp_path: Path, diabetes_csv: Path) -> None:
    data, features, task = prepare(diabetes_csv, "progression")
    assert task is Task.regression
    study, spec, _ = search(tmp_path, data, features, task, ["linear", "hist_gradient_boosting"], trials=6)
    pipe, _ = refit(best_trial(study), data, features, spec)  # type: ignore[arg-type]
    mean_rmse = math.sqrt(float(np.mean((data.y_test - data.y_train.mean()) ** 2)))
    assert holdout_metrics(pipe, data, task)["rmse"] < mean_rmse


def test_categorical_and_missing_values_and_unseen_categories(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 400
    color = rng.choice(["red", "green", "blue", "rare1"], size=n, p=[0.4, 0.3, 0.295, 0.005])
    size = rng.normal(10, 3, n)
    size[rng.random(n) < 0.1] = np.nan
    label = np.where((color == "red") | (np.nan_to_num(size) > 12), "yes", "no")
    frame = pd.DataFrame({"color": color, "size": size, "label": label})
    frame.loc[rng.random(n) < 0.05, "color"] = None
    path = write_csv(tmp_path, frame, "cats.csv")
    data, features, task = prepare(path, "label")
    assert features.categorical == ["color"] and features.numeric == ["size"]
    for family in ("linear", "lightgbm", "xgboost", "torch_mlp"):
        (tmp_path / family).mkdir()
        study, spec, _ = search(tmp_path / family, data, features, task, [family], trials=1)
        pipe, _ = refit(best_trial(study), data, features, spec)  # type: ignore[arg-type]
        odd = coerce(pd.DataFrame({"color": ["purple", None, "red"], "size": [np.nan, 11.0, None]}), features)
        assert set(pipe.predict(odd)) <= {"yes", "no"}


def test_text_columns_are_left_out_and_booleans_used() -> None:
    profile = {
        "rows": 10,
        "columns": [
            {"name": "id_text", "kind": "text"},
            {"name": "flag", "kind": "boolean"},
            {"name": "when", "kind": "datetime"},
            {"name": "y", "kind": "numeric"},
        ],
    }
    features = features_from_profile(profile, "y")
    assert features.numeric == ["flag"] and set(features.dropped) == {"id_text", "when"}


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ({"kind": "categorical", "distinct_count": 3}, Task.classification),
        ({"kind": "numeric", "distinct_count": 3, "integer": True}, Task.classification),
        ({"kind": "numeric", "distinct_count": 3, "integer": False}, Task.regression),
        ({"kind": "numeric", "distinct_count": 200, "integer": True}, Task.regression),
    ],
)
def test_task_detection(profile: dict[str, object], expected: Task) -> None:
    assert detect_task(profile, 1000) is expected


def test_parallel_trials_draw_distinct_configurations(tmp_path: Path, diabetes_csv: Path) -> None:
    """Four trial threads sharing one study: no two trials try the same configuration."""
    data, features, task = prepare(diabetes_csv, "progression")
    lock = threading.Lock()
    claimed = [0]
    results: list[TrialResult] = []

    def claim() -> bool:
        with lock:
            claimed[0] += 1
            return claimed[0] <= 12

    spec = SearchSpec(task=task, metric="rmse", families=["linear", "random_forest"], n_jobs=4, cv_folds=2)
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    run_search(storage, "distinct", data, features, spec, SearchControl(claim=claim, on_trial=results.append))
    configurations = [(r.family, tuple(sorted(r.params.items()))) for r in results]
    assert len(configurations) == 12
    assert len(set(configurations)) == 12, configurations


def test_a_search_starts_from_each_familys_defaults_cheapest_first(tmp_path: Path, diabetes_csv: Path) -> None:
    """The first trials are the learners' own defaults, one per family, in order of cost; then the
    sampler explores (the trial after them is none of the defaults)."""
    data, features, task = prepare(diabetes_csv, "progression")
    families = ["random_forest", "linear", "lightgbm"]
    _study, _spec, results = search(tmp_path, data, features, task, families, trials=4)
    ordered = sorted(results, key=lambda r: r.number)
    assert [r.family for r in ordered[:3]] == ["linear", "lightgbm", "random_forest"]
    for r in ordered[:3]:
        defaults = {k.split(".", 1)[1]: v for k, v in FAMILIES[r.family].defaults}
        assert {k.split(".", 1)[1]: v for k, v in r.params.items()}.items() <= defaults.items(), r
    explored = ordered[3]
    assert {k: v for k, v in explored.params.items()} != dict(FAMILIES[explored.family].defaults)
