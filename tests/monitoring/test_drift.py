"""Drift statistics against a real dataset profile (iris), and live quality against scikit-learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ks_2samp
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error

from miniml.data.formats import detect
from miniml.data.profiles import profile_table
from miniml.monitoring.drift import PSI_DRIFT, drift_report, ks_against_histogram, numeric_counts, psi
from miniml.services.monitoring import quality_of

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def iris() -> tuple[dict[str, Any], pd.DataFrame]:
    return profile_table(detect(IRIS)), pd.read_csv(IRIS)


def window(frame: pd.DataFrame, rows: int, seed: int) -> tuple[dict[str, list[Any]], list[Any]]:
    sample = frame.sample(rows, replace=True, random_state=seed)
    return {c: sample[c].tolist() for c in FEATURES}, sample["target"].tolist()


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift() -> None:
    counts = [10, 20, 40, 20, 10]
    assert psi(counts, counts) == pytest.approx(0.0)
    assert psi(counts, [2 * c for c in counts]) == pytest.approx(0.0)  # proportions, not counts
    small, large = psi(counts, [10, 20, 30, 25, 15]), psi(counts, [0, 5, 15, 40, 40])
    assert 0 < small < 0.1 < PSI_DRIFT < large
    with pytest.raises(ValueError, match="same bins"):
        psi([1, 2], [1, 2, 3])


def test_values_beyond_the_training_range_count_in_the_outer_bins() -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    assert numeric_counts(np.array([-5.0, 0.5, 1.5, 2.5, 99.0]), edges).tolist() == [2, 1, 2]


def test_ks_against_a_histogram_matches_scipy_on_the_underlying_sample() -> None:
    rng = np.random.default_rng(1)
    reference = rng.uniform(0, 10, 20_000)
    counts, edges = np.histogram(reference, bins=50)
    for shift in (0.0, 1.0):
        current = rng.uniform(0, 10, 500) + shift
        d, p = ks_against_histogram(current, edges.tolist(), counts.tolist())
        expected = ks_2samp(current, reference)
        assert d == pytest.approx(expected.statistic, abs=0.02)
        assert (p < 0.01) == (expected.pvalue < 0.01)


def test_in_distribution_traffic_stays_under_0_1_on_every_feature(iris: tuple[dict[str, Any], pd.DataFrame]) -> None:
    profile, frame = iris
    columns, predictions = window(frame, 600, seed=3)
    report = drift_report(profile, "target", columns, predictions)
    assert {f["feature"] for f in report["features"]} == set(FEATURES)
    assert all(f["psi"] < 0.1 for f in report["features"]), report["features"]
    assert report["drifted"] == [] and report["rows"] == 600
    assert report["prediction_psi"] is not None and report["prediction_psi"] < 0.1


def test_a_shifted_feature_is_caught_and_the_others_stay_stable(iris: tuple[dict[str, Any], pd.DataFrame]) -> None:
    profile, frame = iris
    columns, predictions = window(frame, 600, seed=4)
    columns["petal_length"] = [v + 3 for v in columns["petal_length"]]
    report = drift_report(profile, "target", columns, predictions)
    by_name = {f["feature"]: f for f in report["features"]}
    assert by_name["petal_length"]["psi"] > 0.25 and by_name["petal_length"]["ks_p_value"] < 1e-6
    assert all(by_name[c]["psi"] < 0.1 for c in FEATURES if c != "petal_length")
    assert report["drifted"] == ["petal_length"] and report["max_psi"] == by_name["petal_length"]["psi"]


def test_prediction_drift_sees_a_model_that_answers_one_class(iris: tuple[dict[str, Any], pd.DataFrame]) -> None:
    profile, frame = iris
    columns, _ = window(frame, 300, seed=5)
    report = drift_report(profile, "target", columns, ["Iris-virginica"] * 300)
    assert report["prediction_psi"] > PSI_DRIFT


def test_categorical_features_put_unseen_values_in_other() -> None:
    profile = {
        "columns": [
            {
                "name": "color",
                "kind": "categorical",
                "count": 100,
                "null_count": 0,
                "top": [{"value": "red", "count": 50}, {"value": "blue", "count": 50}],
            },
        ]
    }
    same = drift_report(profile, None, {"color": ["red", "blue"] * 50}, [0] * 100)
    assert same["features"][0]["psi"] == pytest.approx(0.0)
    new = drift_report(profile, None, {"color": ["green"] * 60 + ["red"] * 40}, [0] * 100)
    assert new["features"][0]["psi"] > PSI_DRIFT and new["drifted"] == ["color"]


def test_columns_without_a_reference_or_usable_values_are_left_out(iris: tuple[dict[str, Any], pd.DataFrame]) -> None:
    profile, _ = iris
    report = drift_report(profile, "target", {"unknown": [1.0] * 50, "sepal_width": ["x"] * 50}, [None] * 50)
    assert report["features"] == [] and report["max_psi"] == 0.0


def test_quality_matches_scikit_learn() -> None:
    rng = np.random.default_rng(7)
    labels = rng.choice(["a", "b", "c"], 200).tolist()
    predicted = [y if rng.random() < 0.7 else rng.choice(["a", "b", "c"]) for y in labels]
    q = quality_of(list(zip(predicted, labels, strict=True)))
    assert q["task"] == "classification" and q["labelled"] == 200
    assert q["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert q["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    y = rng.normal(size=100)
    p = y + rng.normal(scale=0.3, size=100)
    r = quality_of(list(zip(p.tolist(), y.tolist(), strict=True)))
    assert r["task"] == "regression"
    assert r["rmse"] == pytest.approx(mean_squared_error(y, p) ** 0.5)
    assert r["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert quality_of([]) == {"task": None, "labelled": 0}
