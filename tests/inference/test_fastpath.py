"""The numpy fast path gives the pipeline's own answers, for every family, with missing values."""

from __future__ import annotations

import numpy as np
import optuna
import pandas as pd
import pytest
from sklearn.datasets import make_classification, make_regression
from sklearn.preprocessing import StandardScaler

from miniml.domain.tasks import Task
from miniml.inference.fastpath import compile_numeric
from miniml.training.data import features_from_profile
from miniml.training.families import FAMILIES
from miniml.training.search import build_pipeline

NAMES = [f"f{i}" for i in range(5)]


def data(task: Task, rows: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    if task is Task.classification:
        x, y = make_classification(n_samples=rows, n_features=5, n_informative=3, n_classes=3, random_state=seed)
        labels = np.array(["red", "green", "blue"])[y]
    else:
        x, labels = make_regression(n_samples=rows, n_features=5, noise=5.0, random_state=seed)
    rng = np.random.default_rng(seed)
    x[rng.random(x.shape) < 0.1] = np.nan  # missing values everywhere, imputed by the pipeline
    return pd.DataFrame(x, columns=NAMES), labels


def fitted(family: str, task: Task, categorical: bool = False) -> tuple[object, pd.DataFrame]:
    x, y = data(task, 300, 0)
    columns = [{"name": n, "kind": "numeric"} for n in NAMES]
    if categorical:
        x["colour"] = np.where(np.arange(len(x)) % 2, "a", "b")
        columns.append({"name": "colour", "kind": "categorical"})
    features = features_from_profile({"columns": [*columns, {"name": "y", "kind": "numeric"}]}, "y")
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    estimator = FAMILIES[family].build(trial, task, 0)
    pipe = build_pipeline(features, FAMILIES[family], estimator).fit(x[features.columns], y)
    fresh, _ = data(task, 200, 7)
    if categorical:
        fresh["colour"] = "a"
    return pipe, fresh


@pytest.mark.parametrize("task", [Task.classification, Task.regression])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fast_path_answers_like_the_pipeline(family: str, task: Task) -> None:
    pipe, fresh = fitted(family, task)
    compiled = compile_numeric(pipe, NAMES)
    assert compiled is not None, "numeric preprocessing should compile"
    transform, estimator = compiled
    x = transform({n: fresh[n].to_numpy() for n in NAMES})
    fast, slow = estimator.predict(x), pipe.predict(fresh)  # type: ignore[attr-defined]
    if task is Task.classification:
        assert np.array_equal(fast, slow)
        assert np.allclose(estimator.predict_proba(x), pipe.predict_proba(fresh), rtol=1e-9)  # type: ignore[attr-defined]
    else:  # the same arithmetic in another order: equal to the last bits or so
        assert np.allclose(fast, slow, rtol=1e-9, atol=1e-9)


def test_categorical_columns_keep_the_pipeline() -> None:
    pipe, _ = fitted("linear", Task.classification, categorical=True)
    assert compile_numeric(pipe, [*NAMES, "colour"]) is None


def test_an_unknown_step_keeps_the_pipeline() -> None:
    class OwnScaler(StandardScaler):
        pass

    pipe, _ = fitted("linear", Task.regression)
    numeric = pipe.steps[0][1].transformers_[0][1]  # type: ignore[attr-defined]
    scaler = OwnScaler()
    scaler.__dict__.update(numeric.steps[1][1].__dict__)
    numeric.steps[1] = ("scale", scaler)
    assert compile_numeric(pipe, NAMES) is None


@pytest.mark.parametrize("task", [Task.classification, Task.regression])
def test_random_forests_are_summed_without_joblib_and_answer_the_same(task: Task) -> None:
    pipe, fresh = fitted("random_forest", task)
    compiled = compile_numeric(pipe, NAMES)
    assert compiled is not None
    transform, estimator = compiled
    forest = pipe.steps[-1][1]  # type: ignore[attr-defined]
    assert estimator is not forest and len(estimator.trees) == len(forest.estimators_)
    x = transform({n: fresh[n].to_numpy() for n in NAMES})
    if task is Task.classification:
        assert np.array_equal(estimator.predict(x), forest.predict(x))
        assert np.allclose(estimator.predict_proba(x), forest.predict_proba(x), rtol=1e-12, atol=0)
    else:
        assert np.allclose(estimator.predict(x), forest.predict(x), rtol=1e-12, atol=0)
