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
# Exact distinct counts up to this many values per column; beyond, "at least" this many.
DISTINCT_CAP = 10_000
# The step the columns are profiled in (parsed pieces are about 1 MiB of CSV each).
STEP_BYTES = 1 << 21
# A string column is categorical when it has few distinct values (absolute and relative to rows).
CATEGORICAL_MAX_DISTINCT = 50
_NAN = "NaN"  # stands for every NaN in a column's set of distinct values


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


@dataclass
class _Column:
    name: str
    dtype: pa.DataType
    count: int = 0
    nulls: int = 0
    n: int = 0  # non-null numeric values seen (for the running mean/variance)
    mean: float = 0.0
    m2: float = 0.0
    min: Any = None
    max: Any = None
    distinct: set[Any] = field(default_factory=set)
    distinct_capped: bool = False
    counts: Counter[Any] = field(default_factory=Counter)
    nonfinite: int = 0  # NaN and infinite values (numeric columns; outside min/max/mean/histogram)
    hist: np.ndarray | None = None
    edges: np.ndarray | None = None

    def add(self, arr: pa.Array) -> None:
        self.count += len(arr)
        self.nulls += arr.null_count
        valid = arr.drop_null()
        if len(valid) == 0:
            return
        kind = kind_of(self.dtype)
        if kind in (ColumnKind.numeric, ColumnKind.datetime):
            mm = pc.min_max(valid)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if kind is ColumnKind.numeric:
                lo, hi = self._add_moments(valid.cast(pa.float64()), lo, hi)
            if lo is not None:
                self.min = lo if self.min is None else min(self.min, lo)
                self.max = hi if self.max is None else max(self.max, hi)
            if not self.distinct_capped:
                seen = pc.unique(valid).to_pylist()
                if pa.types.is_floating(self.dtype):  # NaN != NaN: count it once, not once a batch
                    seen = [_NAN if math.isnan(v) else v for v in seen]
                self.distinct.update(seen)
                if len(self.distinct) > DISTINCT_CAP:
                    self.distinct_capped = True
                    self.distinct = set()
        elif len(self.counts) <= DISTINCT_CAP:
            # One hash pass gives both: the values seen (the distinct count) and their counts.
            vc = pc.value_counts(valid)
            self.counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))
            self.distinct_capped = len(self.counts) > DISTINCT_CAP

    def _add_moments(self, values: pa.Array, lo: Any, hi: Any) -> tuple[Any, Any]:
        """Fold this batch's mean and variance into the running ones; return its range. All three
        are of the finite values: a NaN or an infinity is counted apart (``nonfinite``), so one
        "inf" in a column leaves its range, histogram and drift reference intact."""
        mean = pc.mean(values).as_py()
        if not (math.isfinite(lo) and math.isfinite(hi) and mean is not None and math.isfinite(mean)):
            # An infinity shows in the range, a NaN in the mean: only then filter the batch.
            finite = pc.filter(values, pc.is_finite(values))
            self.nonfinite += len(values) - len(finite)
            if len(finite) == 0:
                return None, None
            mm = pc.min_max(finite)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            values, mean = finite, pc.mean(finite).as_py()
        # Chan's parallel update: combine this batch's mean/variance with the running ones.
        nb = len(values)
        m2b = pc.variance(values, ddof=0).as_py() * nb
        delta = mean - self.mean
        total = self.n + nb
        self.mean += delta * nb / total
        self.m2 += m2b + delta * delta * self.n * nb / total
        self.n = total
        return lo, hi

    def prepare_histogram(self) -> None:
        if kind_of(self.dtype) is not ColumnKind.numeric or self.n == 0:
            return
        lo, hi = float(self.min), float(self.max)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        self.edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
        self.hist = np.zeros(HISTOGRAM_BINS, dtype=np.int64)

    def add_histogram(self, arr: pa.Array) -> None:
        if self.edges is None or self.hist is None:
            return
        floats = arr.drop_null().cast(pa.float64())
        # No nulls left: view the data buffer (pyarrow's to_numpy would import pandas into the api).
        values = np.frombuffer(floats.buffers()[1], dtype=np.float64, count=len(floats), offset=floats.offset * 8)
        if self.nonfinite:
            values = values[np.isfinite(values)]
        self.hist += histogram(values, self.edges)

    def result(self, rows: int) -> dict[str, Any]:
        kind = kind_of(self.dtype)
        distinct = None if self.distinct_capped else len(self.distinct or self.counts)
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
            "distinct_count": distinct if distinct is not None else DISTINCT_CAP,
            "distinct_capped": self.distinct_capped,
        }
        if kind is ColumnKind.numeric:
            out |= {
                "min": _num(self.min),
                "max": _num(self.max),
                "mean": _num(self.mean) if self.n else None,
                "std": _num(math.sqrt(self.m2 / (self.n - 1))) if self.n > 1 else None,
                "integer": pa.types.is_integer(self.dtype),
                "nonfinite_count": self.nonfinite,
            }
            if self.hist is not None and self.edges is not None:
                out["histogram"] = {"edges": [float(e) for e in self.edges], "counts": [int(c) for c in self.hist]}
        elif kind is ColumnKind.datetime:
            out |= {"min": _iso(self.min), "max": _iso(self.max)}
        if kind in (ColumnKind.categorical, ColumnKind.boolean, ColumnKind.text):
            out["top"] = [{"value": json_value(v), "count": c} for v, c in self.counts.most_common(TOP_CATEGORIES)]
        return out


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin, exactly as ``np.histogram(values, bins=edges)`` counts them, for values
    within the edges (a batch of a column whose range the edges span).

    Bin i holds edges[i] <= v < edges[i + 1], the last bin its upper edge too. One vectorised
    comparison per inner edge counts the values below it: about 2.5x faster than numpy's own
    (which checks the range, maps values to bins by arithmetic, then corrects for rounding).
    """
    below = [np.count_nonzero(values < edge) for edge in edges[1:-1]]
    return np.diff(np.array([0, *below, len(values)], dtype=np.int64))


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
    columns are also written to a temp Arrow file on the way (binary, read back far faster than
    the text is parsed again). Memory stays flat: both are read a record batch at a time.
    """
    spill_dir = table.path.parent if table.format is FileFormat.csv else None
    with tempfile.TemporaryDirectory(prefix="miniml-profile-", dir=spill_dir) as tmp:
        spill = Path(tmp) / "numeric.arrow" if spill_dir is not None else None
        while True:
            try:
                columns, rows = _first_pass(table, spill)
                break
            except WidenColumn as widen:
                table.widen(widen)
        for col in columns.values():
            col.prepare_histogram()
        binned = [name for name, c in columns.items() if c.edges is not None]
        if binned:
            for batch in _second_pass(table, columns, binned, spill):
                for name, arr in zip(batch.schema.names, batch.columns, strict=True):
                    columns[name].add_histogram(arr)
    return {"rows": rows, "columns": [c.result(rows) for c in columns.values()]}


def _first_pass(table: TableFile, spill: Path | None) -> tuple[dict[str, _Column], int]:
    columns: dict[str, _Column] = {}
    rows = 0
    writer: pa.ipc.RecordBatchStreamWriter | None = None
    numeric: list[str] = []
    try:
        for chunk in prefetch(_grouped(table.batches())):
            if not columns:
                columns = {f.name: _Column(f.name, f.type) for f in chunk.schema}
                numeric = [f.name for f in chunk.schema if kind_of(f.type) is ColumnKind.numeric]
                if spill is not None and numeric:
                    schema = pa.schema([(name, pa.float64()) for name in numeric])
                    writer = pa.ipc.new_stream(pa.OSFile(str(spill), "wb"), schema)
            for name, arr in zip(chunk.schema.names, chunk.columns, strict=True):
                columns[name].add(arr)
            if writer is not None:
                arrays = [chunk.column(name).cast(pa.float64()) for name in numeric]
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, names=numeric))
            rows += chunk.num_rows
    finally:
        if writer is not None:
            writer.close()
    return columns, rows


def _grouped(batches: Iterator[pa.RecordBatch], target_bytes: int = STEP_BYTES) -> Iterator[pa.RecordBatch]:
    """Parsed batches joined into steps of about ``target_bytes``: the per-column work runs once
    per step, not once per batch (compute kernels on one contiguous array beat many small ones)."""
    group: list[pa.RecordBatch] = []
    size = 0
    for batch in batches:
        group.append(batch)
        size += batch.nbytes
        if size >= target_bytes:
            yield pa.concat_batches(group)
            group, size = [], 0
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
    table: TableFile, columns: dict[str, _Column], binned: list[str], spill: Path | None
) -> Iterator[pa.RecordBatch]:
    if spill is not None and spill.exists():
        with pa.OSFile(str(spill), "rb") as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.select(binned)
        return
    # Parquet: columnar already, read only the binned columns; types are settled, nothing inferred.
    yield from table.batches(columns=binned, types={name: c.dtype for name, c in columns.items()})


def schema_of(profile: dict[str, Any]) -> list[dict[str, str]]:
    return [{"name": c["name"], "kind": c["kind"], "arrow_type": c["arrow_type"]} for c in profile["columns"]]
