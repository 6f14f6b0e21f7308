"""Schema and profile of a table, computed in two streaming passes (stats, then histograms).

The profile is kept with the dataset version: it is the reference that drift is measured
against later, so histogram edges and category counts are stored exactly.
"""

from __future__ import annotations

import contextlib
import math
import queue
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from miniml.data.formats import FileFormat, TableFile, WidenColumn

HISTOGRAM_BINS = 10
TOP_CATEGORIES = 20
# Exact distinct counts up to this many values per column; beyond, "at least" this many. A wide
# table shares DISTINCT_BUDGET values between its columns (never under DISTINCT_MIN_CAP each), so
# the profile's memory does not grow with the number of columns times the cap.
DISTINCT_CAP = 10_000
DISTINCT_BUDGET = 1_000_000
DISTINCT_MIN_CAP = 100
# The step the columns are profiled in (parsed pieces are about 1 MiB of CSV each), and at least
# this many rows per step: a wide table's per-step work is per column, so its steps are longer.
STEP_BYTES = 1 << 21
STEP_MIN_ROWS = 512
# A string column is categorical when it has few distinct values (absolute and relative to rows).
CATEGORICAL_MAX_DISTINCT = 50
_unique = pc.get_function("unique")
# Arrow's numeric types that numpy reads straight from the data buffer (others are cast first).
_NUMPY_TYPES = {
    pa.int8(): np.int8,
    pa.int16(): np.int16,
    pa.int32(): np.int32,
    pa.int64(): np.int64,
    pa.uint8(): np.uint8,
    pa.uint16(): np.uint16,
    pa.uint32(): np.uint32,
    pa.uint64(): np.uint64,
    pa.float32(): np.float32,
    pa.float64(): np.float64,
}


class ColumnKind(StrEnum):
    numeric = "numeric"
    categorical = "categorical"
    boolean = "boolean"
    datetime = "datetime"
    text = "text"


def kind_of(dtype: pa.DataType) -> ColumnKind:
    if pa.types.is_boolean(dtype):
        return ColumnKind.boolean
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return ColumnKind.numeric
    if pa.types.is_timestamp(dtype) or pa.types.is_date(dtype):
        return ColumnKind.datetime
    return ColumnKind.text  # refined to categorical once distinct values are known


def distinct_cap(columns: int) -> int:
    return max(DISTINCT_MIN_CAP, min(DISTINCT_CAP, DISTINCT_BUDGET // max(columns, 1)))


@dataclass
class _Column:
    """What is kept per column: counts, distinct values, top categories. Numeric statistics are
    kept for all numeric columns at once (``_Numeric``)."""

    name: str
    dtype: pa.DataType
    cap: int = DISTINCT_CAP
    count: int = 0
    nulls: int = 0
    min: Any = None  # datetime columns (numeric ones: _Numeric)
    max: Any = None
    distinct: pa.Array | None = None  # the distinct values so far (numeric, datetime)
    distinct_capped: bool = False
    counts: Counter[Any] = field(default_factory=Counter)

    def add(self, arr: pa.Array) -> None:
        self.count += len(arr)
        self.nulls += arr.null_count
        kind = kind_of(self.dtype)
        if kind is ColumnKind.numeric and self.distinct_capped:
            return  # nothing more to learn here: its statistics are _Numeric's
        valid = arr.drop_null() if arr.null_count else arr
        if len(valid) == 0:
            return
        if kind is ColumnKind.datetime:
            mm = pc.min_max(valid)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            self.min = lo if self.min is None else min(self.min, lo)
            self.max = hi if self.max is None else max(self.max, hi)
        if kind in (ColumnKind.numeric, ColumnKind.datetime):
            if not self.distinct_capped:
                # Kept as an Arrow array (8 bytes a number), merged by Arrow's hash: NaN counts once.
                both = valid if self.distinct is None else pa.chunked_array([self.distinct, valid])
                merged = _unique.call([both])  # one hash pass; the function object skips the wrapper
                self.distinct_capped = len(merged) > self.cap
                self.distinct = None if self.distinct_capped else merged
        elif len(self.counts) <= self.cap:
            # One hash pass gives both: the values seen (the distinct count) and their counts.
            vc = pc.value_counts(valid)
            self.counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))
            self.distinct_capped = len(self.counts) > self.cap

    def result(self, rows: int, numeric: dict[str, Any] | None) -> dict[str, Any]:
        kind = kind_of(self.dtype)
        if self.distinct_capped:
            distinct = None
        elif kind in (ColumnKind.numeric, ColumnKind.datetime):
            distinct = 0 if self.distinct is None else len(self.distinct)
            if distinct and pa.types.is_floating(self.dtype):  # Arrow's hash tells -0.0 from 0.0
                distinct -= max(0, (pc.sum(pc.equal(self.distinct, 0.0)).as_py() or 0) - 1)
        else:
            distinct = len(self.counts)
        if (
            kind is ColumnKind.text
            and distinct is not None
            and distinct <= max(2, min(CATEGORICAL_MAX_DISTINCT, int(0.5 * max(rows - self.nulls, 1))))
        ):
            kind = ColumnKind.categorical
        out: dict[str, Any] = {
            "name": self.name,
            "kind": kind.value,
            "arrow_type": str(self.dtype),
            "count": self.count,
            "null_count": self.nulls,
            "distinct_count": distinct if distinct is not None else self.cap,
            "distinct_capped": self.distinct_capped,
        }
        if numeric is not None:
            out |= numeric | {"integer": pa.types.is_integer(self.dtype)}
        elif kind is ColumnKind.datetime:
            out |= {"min": _iso(self.min), "max": _iso(self.max)}
        if kind in (ColumnKind.categorical, ColumnKind.boolean, ColumnKind.text):
            out["top"] = [{"value": json_value(v), "count": c} for v, c in self.counts.most_common(TOP_CATEGORIES)]
        return out


def numeric_matrix(batch: pa.RecordBatch, names: list[str]) -> np.ndarray:
    """The numeric columns of a batch as one float64 matrix, a row per column; nulls are NaN.

    Read from the columns' data buffers with numpy (no compute call per column): a wide table's
    statistics then cost a few numpy calls per step whatever its number of columns.
    """
    out = np.empty((len(names), batch.num_rows), dtype=np.float64)
    for row, name in enumerate(names):
        arr = batch.column(name)
        np_type = _NUMPY_TYPES.get(arr.type)
        if np_type is None:  # decimal, half float: Arrow converts
            arr = arr.cast(pa.float64())
            np_type = np.float64
        width = np.dtype(np_type).itemsize
        data = arr.buffers()[1]
        if data is None or len(arr) == 0:
            out[row] = np.nan
            continue
        out[row] = np.frombuffer(data, dtype=np_type, count=len(arr), offset=arr.offset * width)
        if arr.null_count:
            bits = np.frombuffer(arr.buffers()[0], dtype=np.uint8)
            valid = np.unpackbits(bits, bitorder="little")[arr.offset : arr.offset + len(arr)].astype(bool)
            out[row, ~valid] = np.nan
    return out


class _Numeric:
    """Running min, max, mean and variance of every numeric column at once, over finite values;
    NaN and infinities are counted apart (nulls, NaN in the matrix, are counted by _Column)."""

    def __init__(self, names: list[str]) -> None:
        k = len(names)
        self.names = names
        self.n = np.zeros(k, dtype=np.int64)
        self.mean = np.zeros(k)
        self.m2 = np.zeros(k)
        self.min = np.full(k, np.inf)
        self.max = np.full(k, -np.inf)
        self.nonfinite = np.zeros(k, dtype=np.int64)
        self.edges: np.ndarray | None = None
        self.hist: np.ndarray | None = None

    def add(self, matrix: np.ndarray, nulls: np.ndarray) -> None:
        rows = matrix.shape[1]
        finite = np.isfinite(matrix)
        if finite.all():
            nb = np.full(len(self.names), rows, dtype=np.int64)
            mb = matrix.mean(axis=1)
            dev = matrix - mb[:, None]
            lo, hi = matrix.min(axis=1), matrix.max(axis=1)
        else:
            nb = finite.sum(axis=1)
            self.nonfinite += rows - nb - nulls
            with np.errstate(invalid="ignore", divide="ignore"):
                mb = np.where(finite, matrix, 0.0).sum(axis=1) / nb
            dev = np.where(finite, matrix - mb[:, None], 0.0)
            lo = np.where(finite, matrix, np.inf).min(axis=1)
            hi = np.where(finite, matrix, -np.inf).max(axis=1)
        m2b = np.einsum("ij,ij->i", dev, dev)
        # Chan's parallel update: combine this step's mean/variance with the running ones.
        seen = nb > 0
        total = self.n + nb
        weight = np.divide(nb, total, out=np.zeros(len(nb)), where=seen)
        delta = np.where(seen, mb - self.mean, 0.0)
        self.mean = self.mean + delta * weight
        self.m2 = self.m2 + np.where(seen, m2b, 0.0) + delta * delta * self.n * weight
        self.n = total
        self.min = np.minimum(self.min, lo)
        self.max = np.maximum(self.max, hi)

    def prepare_histograms(self) -> None:
        """Edges per column from its finite range (a constant column gets a unit-wide range)."""
        lo, hi = self.min.copy(), self.max.copy()
        empty = self.n == 0  # no finite value: no histogram (placeholder edges, never reported)
        lo[empty], hi[empty] = 0.0, 1.0
        flat = lo == hi
        lo[flat] -= 0.5
        hi[flat] += 0.5
        self.edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1, axis=1)  # a row of edges per column
        self.hist = np.zeros((len(self.names), HISTOGRAM_BINS), dtype=np.int64)

    def add_histograms(self, matrix: np.ndarray) -> None:
        if self.edges is None or self.hist is None:
            return
        finite = np.isfinite(matrix)
        if not finite.all():
            matrix = np.where(finite, matrix, np.nan)  # a NaN is below no edge and counted in no bin
        self.hist += histograms(matrix, self.edges, finite.sum(axis=1))

    def results(self) -> dict[str, dict[str, Any]]:
        return {name: self._result(index) for index, name in enumerate(self.names)}

    def _result(self, index: int) -> dict[str, Any]:
        n = int(self.n[index])
        out: dict[str, Any] = {
            "min": _num(self.min[index]) if n else None,
            "max": _num(self.max[index]) if n else None,
            "mean": _num(self.mean[index]) if n else None,
            "std": _num(math.sqrt(self.m2[index] / (n - 1))) if n > 1 else None,
            "nonfinite_count": int(self.nonfinite[index]),
        }
        if n and self.edges is not None and self.hist is not None:
            out["histogram"] = {
                "edges": [float(e) for e in self.edges[index]],
                "counts": [int(c) for c in self.hist[index]],
            }
        return out


def histograms(matrix: np.ndarray, edges: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Counts per bin for each row of ``matrix`` (a column's values, within its row of ``edges``;
    NaN for values to leave out, ``finite`` of them per row), exactly as ``np.histogram(values,
    bins=edges)`` counts them: bin i holds edges[i] <= v < edges[i + 1], the last bin its upper
    edge too. One vectorised comparison per inner edge counts the values below it, for every
    column at once: a few numpy calls per step, whatever the number of columns.
    """
    below = [np.count_nonzero(matrix < edges[:, [j]], axis=1) for j in range(1, edges.shape[1] - 1)]
    cumulative = np.column_stack([np.zeros(len(matrix), dtype=np.int64), *below, finite])
    return np.diff(cumulative, axis=1)


def _num(value: Any) -> float | None:
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def profile_table(table: TableFile) -> dict[str, Any]:
    """Row count, schema and per-column profile; settles ``table.column_types`` as a side effect.

    One pass reads the file; histograms need each column's range first, so a CSV's numeric
    columns are also written to a temp file on the way (as float64 blocks, read back far faster
    than the text is parsed again). Memory stays flat: both are read a step at a time.
    """
    spill_dir = table.path.parent if table.format is FileFormat.csv else None
    with tempfile.TemporaryDirectory(prefix="miniml-profile-", dir=spill_dir) as tmp:
        spill = Path(tmp) / "numeric.f64" if spill_dir is not None else None
        while True:
            try:
                columns, numeric, rows, blocks = _first_pass(table, spill)
                break
            except WidenColumn as widen:
                table.widen(widen)
        if numeric is not None and numeric.names:
            numeric.prepare_histograms()
            for matrix in _second_pass(table, columns, numeric.names, spill, blocks):
                numeric.add_histograms(matrix)
    numbers = numeric.results() if numeric is not None else {}
    return {"rows": rows, "columns": [c.result(rows, numbers.get(name)) for name, c in columns.items()]}


def _first_pass(table: TableFile, spill: Path | None) -> tuple[dict[str, _Column], _Numeric | None, int, list[int]]:
    columns: dict[str, _Column] = {}
    numeric: _Numeric | None = None
    rows = 0
    blocks: list[int] = []  # rows per block written to the spill file
    with spill.open("wb") if spill is not None else contextlib.nullcontext() as out:
        for chunk in prefetch(_grouped(table.batches())):
            if numeric is None:
                cap = distinct_cap(chunk.num_columns)
                columns = {f.name: _Column(f.name, f.type, cap=cap) for f in chunk.schema}
                numeric = _Numeric([f.name for f in chunk.schema if kind_of(f.type) is ColumnKind.numeric])
            for name, arr in zip(chunk.schema.names, chunk.columns, strict=True):
                columns[name].add(arr)
            if numeric.names:
                matrix = numeric_matrix(chunk, numeric.names)
                numeric.add(matrix, np.array([chunk.column(name).null_count for name in numeric.names]))
                if out is not None:
                    matrix.tofile(out)
                    blocks.append(chunk.num_rows)
            rows += chunk.num_rows
    return columns, numeric, rows, blocks


def _grouped(
    batches: Iterator[pa.RecordBatch], target_bytes: int = STEP_BYTES, min_rows: int = STEP_MIN_ROWS
) -> Iterator[pa.RecordBatch]:
    """Parsed batches joined into steps of about ``target_bytes`` and at least ``min_rows``: the
    per-column work runs once per step, not once per batch (compute kernels on one contiguous
    array beat many small ones)."""
    group: list[pa.RecordBatch] = []
    size = rows = 0
    for batch in batches:
        group.append(batch)
        size += batch.nbytes
        rows += batch.num_rows
        if size >= target_bytes and rows >= min_rows:
            yield pa.concat_batches(group)
            group, size, rows = [], 0, 0
    if group:
        yield pa.concat_batches(group)


def prefetch(batches: Iterator[pa.RecordBatch], depth: int = 2) -> Iterator[pa.RecordBatch]:
    """Read the next batches on a thread while the caller works on this one.

    Parsing and the compute kernels both release the GIL, so on two cores a pass costs about the
    slower of the two instead of their sum. Errors (WidenColumn, InvalidInput) reach the caller.
    """
    out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        out.put(("batch", batch), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put(("end", None))
        except BaseException as exc:  # handed to the consumer
            out.put(("error", exc))

    thread = threading.Thread(target=produce, name="miniml-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = out.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:  # free the producer if it waits to hand over a batch
                out.get_nowait()
        thread.join()
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _second_pass(
    table: TableFile, columns: dict[str, _Column], names: list[str], spill: Path | None, blocks: list[int]
) -> Iterator[np.ndarray]:
    if spill is not None:
        with spill.open("rb") as source:
            for rows in blocks:
                yield np.fromfile(source, dtype=np.float64, count=rows * len(names)).reshape(len(names), rows)
        return
    # Parquet: columnar already, read only the numeric columns; types are settled, nothing inferred.
    for batch in _grouped(table.batches(columns=names, types={name: c.dtype for name, c in columns.items()})):
        yield numeric_matrix(batch, names)


def schema_of(profile: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": c["name"], "kind": c["kind"], "arrow_type": c["arrow_type"]} for c in profile["columns"]]
