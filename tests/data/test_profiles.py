"""The profile against numbers computed independently (numpy, pandas) on the same data."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from miniml.data.formats import detect
from miniml.data.profiles import (
    DISTINCT_CAP,
    DISTINCT_MIN_CAP,
    distinct_cap,
    histograms,
    numeric_matrix,
    profile_table,
)


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """``histograms`` for one column of finite values."""
    counts: np.ndarray = histograms(values[None, :], edges[None, :], np.array([len(values)]))[0]
    return counts


@pytest.mark.parametrize("seed", range(6))
def test_histogram_counts_as_numpy_does_with_the_same_edges(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.normal(0, 3, 5000).round(seed % 3)  # rounding makes ties, some on the edges
    edges = np.linspace(values.min(), values.max(), 11)
    values = np.concatenate([values, edges, edges[[0, -1, -1]]])  # every edge itself, ends twice
    got = histogram(values, edges)
    want, _ = np.histogram(values, bins=edges)
    assert got.tolist() == want.tolist() and got.sum() == len(values)


def test_histogram_of_a_constant_column() -> None:
    values = np.full(7, 2.0)
    edges = np.linspace(1.5, 2.5, 11)  # what the profile uses when min == max
    assert histogram(values, edges).tolist() == np.histogram(values, bins=edges)[0].tolist()


def test_profile_matches_numpy_and_pandas_on_a_file_of_many_steps(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 120_000  # about 6 MB of CSV: the profile works through it in several steps
    frame = pd.DataFrame(
        {
            "x": rng.normal(5, 2, n).round(3),
            "small": rng.integers(0, 40, n),
            # non-finite values only in the last rows, so the first steps see none
            "late_inf": np.where(np.arange(n) > n - 50, np.inf, rng.random(n)),
            "late_nan": np.where(np.arange(n) % 9_973 == 0, np.nan, rng.random(n)),
            "city": rng.choice(["oslo", "rome", "lima"], n),
            "ids": [f"id{i}" for i in rng.integers(0, 3 * DISTINCT_CAP, n)],
            "flag": rng.random(n) < 0.2,
        }
    )
    frame.loc[rng.choice(n, 30, replace=False), "x"] = np.nan
    path = tmp_path / "many.csv"
    frame.to_csv(path, index=False)

    profile = profile_table(detect(path, filename=path.name))
    cols = {c["name"]: c for c in profile["columns"]}
    assert profile["rows"] == n

    for name in ("x", "small", "late_inf", "late_nan"):
        col = cols[name]
        raw = frame[name].to_numpy(dtype=float)
        finite = raw[np.isfinite(raw)]
        assert col["kind"] == "numeric" and col["null_count"] == int(pd.isna(frame[name]).sum())
        assert math.isclose(col["mean"], finite.mean(), rel_tol=1e-9)
        assert math.isclose(col["std"], finite.std(ddof=1), rel_tol=1e-9)
        assert col["min"] == finite.min() and col["max"] == finite.max()
        assert col["nonfinite_count"] == int((~np.isfinite(raw) & ~np.isnan(raw)).sum())  # NaN is empty: null
        edges = np.array(col["histogram"]["edges"])
        assert edges[0] == finite.min() and edges[-1] == finite.max()
        want, _ = np.histogram(finite, bins=edges)
        assert col["histogram"]["counts"] == want.tolist(), name
    assert cols["late_inf"]["nonfinite_count"] == 49
    assert cols["small"]["distinct_count"] == frame["small"].nunique()

    city = cols["city"]
    assert city["kind"] == "categorical" and city["distinct_count"] == 3
    assert {t["value"]: t["count"] for t in city["top"]} == dict(Counter(frame["city"]))
    assert cols["ids"]["distinct_capped"] is True and cols["ids"]["kind"] == "text"
    assert {t["value"]: t["count"] for t in cols["flag"]["top"]} == dict(Counter(frame["flag"].tolist()))


def test_nan_and_infinity_in_parquet_are_counted_apart_and_once(tmp_path: Path) -> None:
    """Parquet keeps NaN (a CSV's "nan" reads as null): NaN and infinities stay out of the range,
    the moments and the histogram, are counted, and NaN is one distinct value however often."""
    rng = np.random.default_rng(3)
    n = 200_000  # several steps, NaN in each
    values = rng.normal(0, 1, n)
    values[::1000] = np.nan
    values[5::7919] = np.inf
    values[7::7919] = -np.inf
    path = tmp_path / "odd.parquet"
    k = (np.arange(n) % 5).astype(float)
    k[1::1000] = np.nan
    pq.write_table(pa.table({"v": pa.array(values), "k": pa.array(k)}), path)  # pandas would make NaN null

    cols = {c["name"]: c for c in profile_table(detect(path, filename=path.name))["columns"]}
    finite = values[np.isfinite(values)]
    v = cols["v"]
    assert v["nonfinite_count"] == n - len(finite) and v["null_count"] == 0
    assert v["min"] == finite.min() and v["max"] == finite.max()
    assert math.isclose(v["mean"], finite.mean(), rel_tol=1e-9)
    assert v["histogram"]["counts"] == np.histogram(finite, bins=np.array(v["histogram"]["edges"]))[0].tolist()
    assert cols["k"]["distinct_count"] == 6  # 0..4 and NaN


def test_numeric_matrix_reads_every_numeric_type_with_nulls_and_offsets() -> None:
    rng = np.random.default_rng(5)
    n = 1000
    nulls = rng.random(n) < 0.1
    arrays = {
        "i8": pa.array(rng.integers(-100, 100, n).astype(np.int8), mask=nulls),
        "u64": pa.array(rng.integers(0, 2**40, n).astype(np.uint64)),
        "i64": pa.array(rng.integers(-(2**40), 2**40, n), mask=nulls),
        "f32": pa.array(rng.random(n).astype(np.float32), mask=nulls),
        "f64": pa.array(rng.normal(0, 1, n)),
        "dec": pa.array([None if m else round(float(v), 2) for v, m in zip(rng.random(n), nulls, strict=True)]).cast(
            pa.decimal128(10, 2)
        ),
    }
    batch = pa.RecordBatch.from_pydict(arrays).slice(37, 900)  # an offset that is no multiple of 8
    got = numeric_matrix(batch, list(arrays))
    for row, name in enumerate(arrays):
        want = np.array([np.nan if v is None else float(v) for v in batch.column(name).to_pylist()])
        np.testing.assert_allclose(got[row], want, rtol=1e-15, err_msg=name)  # decimals: Arrow casts


def test_a_wide_table_profiles_like_numpy_and_shares_the_distinct_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    rows, wide = 1500, 1200
    frame = pd.DataFrame(rng.normal(0, 1, (rows, wide)).round(2), columns=[f"f{i}" for i in range(wide)])
    frame["flag"] = rng.integers(0, 2, rows)
    frame["city"] = rng.choice(["oslo", "rome"], rows)
    frame.loc[rng.random(rows) < 0.05, "f3"] = np.nan  # nulls in the CSV
    path = tmp_path / "wide.csv"
    frame.to_csv(path, index=False)

    cols = {c["name"]: c for c in profile_table(detect(path, filename=path.name))["columns"]}
    cap = distinct_cap(wide + 2)
    assert DISTINCT_MIN_CAP <= cap < DISTINCT_CAP
    for name in ("f0", "f3", f"f{wide - 1}", "flag"):
        raw = frame[name].to_numpy(dtype=float)
        finite = raw[np.isfinite(raw)]
        col = cols[name]
        assert col["null_count"] == rows - len(finite)
        assert col["min"] == finite.min() and col["max"] == finite.max()
        assert math.isclose(col["mean"], finite.mean(), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(col["std"], finite.std(ddof=1), rel_tol=1e-9)
        edges = np.array(col["histogram"]["edges"])
        assert col["histogram"]["counts"] == np.histogram(finite, bins=edges)[0].tolist()
        exact = len(np.unique(finite))
        assert (col["distinct_count"], col["distinct_capped"]) == ((exact, False) if exact <= cap else (cap, True))
    assert cols["flag"]["distinct_count"] == 2 and cols["city"]["kind"] == "categorical"
