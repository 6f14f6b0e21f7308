"""Loaded models and the input checks made against their signatures."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

import miniml.tracking  # noqa: F401  (MLflow settings for every process that loads models)
from miniml.errors import InvalidInput
from miniml.inference.batching import Batcher, Columns
from miniml.inference.fastpath import compile_numeric
from miniml.tracking.signing import load_verified_with_example

_NUMERIC = {"double", "float", "long", "integer"}


@dataclass
class Column:
    name: str
    kind: str  # "number", "string", "boolean", "any"


@dataclass
class LoadedModel:
    registered: str
    version: str
    model: Any
    columns: list[Column]
    classes: list[Any] | None
    batcher: Batcher
    load_seconds: float
    # Rows logged with the version (its input example): a rollout predicts them before switching.
    example: list[dict[str, Any]] | None = None


def load(tracking_uri: str, registered: str, version: str, *, max_batch_rows: int, signing_key: bytes) -> LoadedModel:
    """Load the scikit-learn model itself (not pyfunc), once its signature and digest check out; its
    schema checks are done here, faster."""
    start = time.perf_counter()
    model, signature, example = load_verified_with_example(tracking_uri, registered, version, signing_key)
    columns = []
    if signature is not None and signature.inputs is not None:
        for spec in signature.inputs.inputs:
            kind = str(getattr(spec.type, "name", spec.type)).lower()
            columns.append(
                Column(
                    name=str(spec.name),
                    kind="number"
                    if kind in _NUMERIC
                    else "boolean"
                    if kind == "boolean"
                    else "string"
                    if kind == "string"
                    else "any",
                )
            )
    names = [c.name for c in columns]
    classes = [c.item() if hasattr(c, "item") else c for c in getattr(model, "classes_", [])] or None
    return LoadedModel(
        registered=registered,
        version=version,
        model=model,
        columns=columns,
        classes=classes,
        batcher=Batcher(
            model,
            names,
            max_rows=max_batch_rows,
            fast=compile_numeric(model, names) if columns and all(c.kind == "number" for c in columns) else None,
        ),
        load_seconds=time.perf_counter() - start,
        example=_records(example),
    )


def _records(example: Any) -> list[dict[str, Any]] | None:
    """The input example as JSON-like rows (what a caller would send), or None."""
    import pandas as pd

    if not isinstance(example, pd.DataFrame) or example.empty:
        return None
    rows: list[dict[str, Any]] = orjson.loads(example.head(20).to_json(orient="records"))
    return rows


def parse_rows(body: Any, model: LoadedModel, *, max_rows: int) -> tuple[Columns, int, list[str]]:
    """Check a body against the signature; return per-column values, the row count and ignored columns."""
    if not isinstance(body, dict):
        raise InvalidInput('Send a JSON object: {"rows": [{...}, ...]} or {"columns": [...], "data": [[...], ...]}.')
    expected = ", ".join(c.name for c in model.columns)
    by_name = "rows" in body  # rows as objects: read them with dict.get, no call per value
    if by_name:
        rows = body["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InvalidInput('"rows" must be a list of objects, one per row: [{"column": value, ...}].')
        names = {k for r in rows for k in r}

        def get(r: Any, name: str) -> Any:
            return r.get(name, _MISSING)

        records: list[Any] = rows
    elif "data" in body and "columns" in body:
        cols, data = body["columns"], body["data"]
        if not isinstance(cols, list) or not isinstance(data, list) or not all(isinstance(r, list) for r in data):
            raise InvalidInput('"columns" must be a list of names and "data" a list of rows (lists of values).')
        index = {str(c): i for i, c in enumerate(cols)}
        for i, r in enumerate(data, start=1):
            if len(r) != len(cols):
                raise InvalidInput(f"Row {i} has {len(r)} values but {len(cols)} columns are named.")
        names = set(index)

        def get(r: Any, name: str) -> Any:
            return r[index[name]] if name in index else _MISSING

        records = data
    else:
        raise InvalidInput(
            f'Send {{"rows": [...]}} or {{"columns": [...], "data": [...]}}; the model expects {expected}.'
        )
    if not records:
        raise InvalidInput(f"No rows to predict; send at least one row with {expected}.")
    if len(records) > max_rows:
        raise InvalidInput(f"{len(records)} rows is more than the {max_rows} one request may carry; split it.")
    out: Columns = {}
    for col in model.columns:
        name = col.name
        values = [r.get(name, _MISSING) for r in records] if by_name else [get(r, name) for r in records]
        # Fast path: one type check per column; the per-value path runs only when it fails,
        # and then names the first offending row.
        clean = _FAST.get(col.kind)
        if clean is None or not all(type(v) in clean for v in values):
            values = [_check(col, v, i, expected) for i, v in enumerate(values, start=1)]
        if col.kind == "number":
            # Numbers travel as one float array per column (NaN for null): the frame, a batch of
            # several requests and the drift capture all take it without a loop over values.
            array = np.array(values, dtype=np.float64)
            if np.isinf(array).any():
                row = int(np.flatnonzero(np.isinf(array))[0]) + 1
                raise InvalidInput(f"Column {name!r} needs a finite number; row {row} has {values[row - 1]!r}.")
            out[name] = array
        else:
            out[name] = values
    ignored = sorted(names - {c.name for c in model.columns})
    return out, len(records), ignored


_MISSING = object()


_FAST: dict[str, set[type]] = {"number": {float, int}, "string": {str}, "boolean": {bool}}


def _check(col: Column, value: Any, row: int, expected: str) -> Any:
    if value is _MISSING:
        raise InvalidInput(f"Column {col.name!r} is missing (row {row}); the model expects {expected}.")
    if value is None:
        return math.nan if col.kind == "number" else None
    if col.kind == "number":
        if not isinstance(value, int | float):  # booleans are numbers to the pipeline (0/1)
            raise InvalidInput(f"Column {col.name!r} needs a number; row {row} has {value!r}.")
        return float(value)
    if col.kind == "string":
        if isinstance(value, dict | list):
            raise InvalidInput(f"Column {col.name!r} needs a text value; row {row} has {value!r}.")
        return value if isinstance(value, str) else str(value)
    if col.kind == "boolean" and not isinstance(value, bool):
        raise InvalidInput(f"Column {col.name!r} needs true or false; row {row} has {value!r}.")
    return value
