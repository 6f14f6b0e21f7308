"""A numpy form of a pipeline's numeric preprocessing, for serving.

scikit-learn's ColumnTransformer spends milliseconds per call on checks and bookkeeping
(4 ms for one row of iris on a small machine, ten times the logistic regression behind it).
When a pipeline's preprocessing is made only of steps with a closed form — median or mean
imputation of NaN and standard scaling of numeric columns — the same arithmetic is a few numpy
operations on the request's float arrays. Anything else (one-hot encoding, another transformer,
an option not handled here) keeps the pipeline as it is.

``compile_numeric`` checks its result against the pipeline's own transform on probe rows
(with missing values) before it is used, so a difference can only cost speed, never answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger("miniml.inference")

Transform = Callable[[dict[str, np.ndarray]], np.ndarray]


def compile_numeric(pipeline: Any, names: list[str]) -> tuple[Transform, Any] | None:
    """(transform, final estimator) for a Pipeline([ColumnTransformer, estimator]) over numbers, or None."""
    steps = getattr(pipeline, "steps", None)
    if not steps or len(steps) != 2:
        return None
    pre, estimator = steps[0][1], steps[1][1]
    plan = _plan(pre, names)
    if plan is None:
        return None
    transform = _build(plan)
    if not _agrees(pre, transform, names):
        log.warning("numeric fast path disagrees with the pipeline; serving with the pipeline")
        return None
    return transform, _fast_forest(estimator, transform(_probe(names)))


class _Forest:
    """A random forest's prediction as scikit-learn computes it with n_jobs=1 — the sum of its
    trees' leaf values in tree order, over the tree count — without a joblib task, an input
    check and a lock per tree (a third or more of a small batch's cost with 100 trees)."""

    def __init__(self, forest: Any) -> None:
        self.trees = [tree.tree_ for tree in forest.estimators_]
        self.classes_ = getattr(forest, "classes_", None)

    def _sum(self, x: np.ndarray, width: int) -> np.ndarray:
        x32 = np.ascontiguousarray(x, dtype=np.float32)
        total = np.zeros((x32.shape[0], width), dtype=np.float64)
        for tree in self.trees:
            total += tree.predict(x32)[:, :width]
        total /= len(self.trees)
        return total

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        assert self.classes_ is not None
        return self._sum(x, len(self.classes_))

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.classes_ is None:
            return self._sum(x, 1)[:, 0]
        return np.asarray(self.classes_.take(np.argmax(self.predict_proba(x), axis=1), axis=0))


def _fast_forest(estimator: Any, probe: np.ndarray) -> Any:
    """The forest's fast form when it is a single-output scikit-learn random forest or extra trees
    (both average their trees alike) and gives the same answers on the probe rows; otherwise the
    estimator itself."""
    from sklearn.ensemble import (
        ExtraTreesClassifier,
        ExtraTreesRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )

    forests = (RandomForestClassifier, RandomForestRegressor, ExtraTreesClassifier, ExtraTreesRegressor)
    if type(estimator) not in forests or estimator.n_outputs_ != 1:
        return estimator
    fast = _Forest(estimator)
    try:
        if fast.classes_ is not None:
            same = np.array_equal(fast.predict(probe), estimator.predict(probe)) and np.allclose(
                fast.predict_proba(probe), estimator.predict_proba(probe), rtol=1e-9, atol=1e-12
            )
        else:
            same = np.allclose(fast.predict(probe), estimator.predict(probe), rtol=1e-9, atol=1e-9)
    except Exception:
        return estimator
    return fast if same else estimator


# One block of output columns: which inputs, NaN replacement per input, then (x - shift) / scale.
_Block = tuple[list[str], np.ndarray | None, np.ndarray | None, np.ndarray | None]


def _plan(pre: Any, names: list[str]) -> list[_Block] | None:
    from sklearn.compose import ColumnTransformer

    if type(pre) is not ColumnTransformer or not hasattr(pre, "transformers_"):
        return None
    known = set(names)
    blocks: list[_Block] = []
    for _name, trans, columns in pre.transformers_:
        if trans == "drop":
            continue
        if not isinstance(columns, list) or not all(isinstance(c, str) and c in known for c in columns):
            return None
        if trans == "passthrough":
            blocks.append((columns, None, None, None))
            continue
        block = _numeric_block(trans, columns)
        if block is None:
            return None
        blocks.append(block)
    return blocks or None


def _numeric_block(trans: Any, columns: list[str]) -> _Block | None:
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    parts = [step for _n, step in trans.steps] if type(trans) is Pipeline else [trans]
    fill: np.ndarray | None = None
    shift: np.ndarray | None = None
    scale: np.ndarray | None = None
    for i, step in enumerate(parts):
        if type(step) is SimpleImputer and i == 0:
            if step.strategy not in ("mean", "median"):
                return None
            stats = np.asarray(step.statistics_, dtype=np.float64)
            missing = step.missing_values
            if (
                step.add_indicator
                or not (isinstance(missing, float) and np.isnan(missing))
                or stats.shape != (len(columns),)
                or (np.isnan(stats).any() and not step.keep_empty_features)
            ):
                return None
            # keep_empty_features: an all-missing training column is imputed with 0.
            fill = np.where(np.isnan(stats), 0.0, stats)
        elif type(step) is StandardScaler and scale is None and shift is None:
            n = len(columns)
            shift = np.asarray(step.mean_, dtype=np.float64) if step.with_mean else np.zeros(n)
            scale = np.asarray(step.scale_, dtype=np.float64) if step.with_std else np.ones(n)
            if shift.shape != (n,) or scale.shape != (n,):
                return None
        else:
            return None
    return columns, fill, shift, scale


def _build(plan: list[_Block]) -> Transform:
    def transform(data: dict[str, np.ndarray]) -> np.ndarray:
        parts = []
        for columns, fill, shift, scale in plan:
            x = np.column_stack([data[c] for c in columns]).astype(np.float64, copy=False)
            if fill is not None:
                x = np.where(np.isnan(x), fill, x)
            if shift is not None and scale is not None:
                x = (x - shift) / scale
            parts.append(x)
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    return transform


def _probe(names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    probe = {name: rng.normal(0, 10, 64) for name in names}
    for i, name in enumerate(names):  # a missing value in every column, in different rows
        probe[name][i % 64] = np.nan
    return probe


def _agrees(pre: Any, transform: Transform, names: list[str]) -> bool:
    import pandas as pd

    probe = _probe(names)
    try:
        expected = np.asarray(pre.transform(pd.DataFrame(probe, columns=names)), dtype=np.float64)
        got = transform(probe)
    except Exception:
        return False
    return expected.shape == got.shape and bool(np.allclose(expected, got, rtol=1e-9, atol=1e-12, equal_nan=True))
