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
    return transform, estimator


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


def _agrees(pre: Any, transform: Transform, names: list[str]) -> bool:
    import pandas as pd

    rng = np.random.default_rng(0)
    probe = {name: rng.normal(0, 10, 16) for name in names}
    for i, name in enumerate(names):  # a missing value in every column, in different rows
        probe[name][i % 16] = np.nan
    try:
        expected = np.asarray(pre.transform(pd.DataFrame(probe, columns=names)), dtype=np.float64)
        got = transform(probe)
    except Exception:
        return False
    return expected.shape == got.shape and bool(np.allclose(expected, got, rtol=1e-9, atol=1e-12, equal_nan=True))
