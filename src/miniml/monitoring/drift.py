"""Data drift of served inputs and predictions against the training dataset's stored profile.

Pure functions: no web, DB or storage code. The reference is a dataset version's profile (see
``miniml.data.profiles``): numeric columns keep their histogram (counts and bin edges),
categorical ones their top categories with counts. A captured window is compared with it:

- **PSI** (population stability index) per feature over the profile's bins. The outer bins are
  open, so values beyond the training range count in the first or last bin. Categories outside
  the profile's top list share one "other" bin. Proportions are floored at ``EPSILON`` so an
  empty bin gives a large, finite value.
- **KS** for numeric features: the largest gap between the window's empirical CDF and the
  reference CDF (piecewise linear within each histogram bin), with its one-sample p-value.
- **Prediction drift**: PSI of the predictions against the training target's distribution.

Rule of thumb (the thresholds used for ``drifted``): PSI < 0.1 stable, 0.1 to 0.25 moderate,
> 0.25 a significant shift.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

EPSILON = 1e-4
PSI_DRIFT = 0.25
OTHER = "(other)"


def psi(expected: Iterable[float], actual: Iterable[float]) -> float:
    """PSI of two count (or proportion) vectors over the same bins."""
    e = np.asarray(list(expected), dtype=float)
    a = np.asarray(list(actual), dtype=float)
    if e.shape != a.shape or e.size == 0:
        raise ValueError("PSI needs two count vectors over the same bins")
    if e.sum() <= 0 or a.sum() <= 0:
        return 0.0
    p = np.maximum(e / e.sum(), EPSILON)
    q = np.maximum(a / a.sum(), EPSILON)
    return float(np.sum((q - p) * np.log(q / p)))


def numeric_counts(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Counts of values in the profile's bins, the outer two open-ended."""
    inner = np.asarray(edges[1:-1], dtype=float)
    idx = np.searchsorted(inner, values, side="right")
    return np.bincount(idx, minlength=len(edges) - 1)


def ks_against_histogram(values: np.ndarray, edges: list[float], counts: list[int]) -> tuple[float, float]:
    """One-sample KS statistic and p-value of ``values`` against the histogram's CDF."""
    from scipy.stats import kstwo

    x = np.sort(values)
    n = len(x)
    e = np.asarray(edges, dtype=float)
    c = np.asarray(counts, dtype=float)
    cdf_at_edges = np.concatenate([[0.0], np.cumsum(c) / c.sum()])
    ref = np.interp(x, e, cdf_at_edges, left=0.0, right=1.0)
    hi = np.arange(1, n + 1) / n
    lo = np.arange(0, n) / n
    d = float(max(np.max(hi - ref), np.max(ref - lo)))
    return d, float(kstwo.sf(d, n))


def _category_key(value: Any) -> str:
    return "null" if value is None else str(value)


def categorical_bins(reference: dict[str, Any], values: Iterable[Any]) -> tuple[list[str], list[float], list[float]]:
    """Categories of the profile (plus "other"), the reference counts and the window's counts."""
    top = {_category_key(t["value"]): float(t["count"]) for t in reference.get("top", [])}
    non_null = float(reference.get("count", 0)) - float(reference.get("null_count", 0))
    other = max(non_null - sum(top.values()), 0.0)
    seen = Counter(_category_key(v) for v in values if v is not None)
    names = [*top, OTHER]
    expected = [*top.values(), other]
    actual = [float(seen.get(k, 0)) for k in top] + [float(sum(n for k, n in seen.items() if k not in top))]
    return names, expected, actual


def _finite(values: list[Any]) -> np.ndarray:
    arr = np.asarray([float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)], dtype=float)
    finite: np.ndarray = arr[np.isfinite(arr)]
    return finite


def feature_drift(reference: dict[str, Any], values: list[Any]) -> dict[str, Any] | None:
    """Drift of one feature's captured values against its profile column; None when it cannot be measured."""
    kind = reference.get("kind")
    out: dict[str, Any] = {"feature": reference["name"], "kind": kind, "rows": len(values)}
    hist = reference.get("histogram")
    if kind == "numeric" and hist:
        x = _finite(values)
        if len(x) == 0:
            return None
        out["psi"] = psi(hist["counts"], numeric_counts(x, hist["edges"]))
        out["ks"], out["ks_p_value"] = ks_against_histogram(x, hist["edges"], hist["counts"])
        out["mean"] = float(x.mean())
        out["reference_mean"] = reference.get("mean")
    elif kind in ("categorical", "boolean") and reference.get("top"):
        _, expected, actual = categorical_bins(reference, values)
        if sum(actual) == 0:
            return None
        out["psi"] = psi(expected, actual)
    else:
        return None
    out["drifted"] = out["psi"] > PSI_DRIFT
    return out


def prediction_drift(target: dict[str, Any] | None, predictions: list[Any]) -> float | None:
    """PSI of the predictions against the training target's profile (classes or histogram)."""
    if target is None or not predictions:
        return None
    result = feature_drift(target, predictions)
    if result is None and target.get("kind") == "text" and target.get("top"):
        _, expected, actual = categorical_bins(target, predictions)
        return psi(expected, actual) if sum(actual) else None
    return None if result is None else float(result["psi"])


def drift_report(
    profile: dict[str, Any], target: str | None, columns: dict[str, list[Any]], predictions: list[Any]
) -> dict[str, Any]:
    """Per-feature drift of a captured window, and the predictions' drift against the target."""
    by_name = {c["name"]: c for c in profile.get("columns", [])}
    features = []
    for name, values in columns.items():
        ref = by_name.get(name)
        if ref is None or name == target:
            continue
        result = feature_drift(ref, values)
        if result is not None:
            features.append(result)
    pred = prediction_drift(by_name.get(target) if target else None, predictions)
    return {
        "features": sorted(features, key=lambda f: -f["psi"]),
        "prediction_psi": pred,
        "max_psi": max((f["psi"] for f in features), default=0.0),
        "drifted": [f["feature"] for f in features if f["drifted"]],
        "rows": len(predictions),
    }
