"""A bounded sample of inputs and predictions per deployment, written to the object store.

Adding to the buffer costs a list extend per column on the request path; serialising and writing happen
on a thread at flush time. Each line holds the rows of one flush and model version, columnar:
{"at" (the newest row's time), "version", "columns": {name: [values]}, "predictions": [...]}.
A full buffer drops the sample and counts it: capture never slows down or fails a request.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter

from miniml.inference.batching import Columns
from miniml.storage import ObjectStore

log = logging.getLogger("miniml.inference")


@dataclass
class _Rows:
    """The captured rows of one deployment and model version since the last flush, by column.

    Rows are appended as they are served (a list extend per column), so a flush is one orjson
    call per group: the flush thread never loops over requests while holding the GIL, and the
    buffer is a few lists of numbers, not an object per request for the collector to scan.
    """

    at: float = 0.0
    rows: int = 0
    columns: dict[str, list[Any]] = field(default_factory=dict)
    predictions: list[Any] = field(default_factory=list)

    def add(self, columns: Columns, predictions: list[Any]) -> None:
        n = len(predictions)
        for name, values in columns.items():
            column = self.columns.get(name)
            if column is None:
                column = self.columns[name] = [None] * self.rows
            column.extend(values.tolist() if isinstance(values, np.ndarray) else values)
        for column in self.columns.values():  # a column this request lacked
            if len(column) < self.rows + n:
                column.extend([None] * (self.rows + n - len(column)))
        self.predictions.extend(predictions)
        self.rows += n
        self.at = time.time()


class Capture:
    def __init__(
        self, store: ObjectStore, replica: str, *, fraction: float, max_rows: int, registry: CollectorRegistry
    ) -> None:
        self.store, self.replica, self.fraction, self.max_rows = store, replica, fraction, max_rows
        self.buffer: dict[tuple[str, str, str], _Rows] = {}
        self.rows = 0
        self.lock = threading.Lock()
        self.captured = Counter(
            "miniml_inference_capture_rows_total", "Rows kept for drift.", ["deployment"], registry=registry
        )
        self.dropped = Counter(
            "miniml_inference_capture_dropped_total",
            "Rows not kept because the buffer was full.",
            ["deployment"],
            registry=registry,
        )

    def add(self, project: str, deployment: str, version: str, columns: Columns, predictions: list[Any]) -> None:
        if self.fraction <= 0 or (self.fraction < 1 and random.random() >= self.fraction):  # noqa: S311
            return
        n = len(predictions)
        with self.lock:
            if self.rows + n > self.max_rows:
                self.dropped.labels(deployment).inc(n)
                return
            group = self.buffer.get((project, deployment, version))
            if group is None:
                group = self.buffer[(project, deployment, version)] = _Rows()
            group.add(columns, predictions)
            self.rows += n
        self.captured.labels(deployment).inc(n)

    def flush(self) -> list[str]:
        """Write what is buffered, one JSON-lines file per deployment; return the keys written."""
        with self.lock:
            groups, self.buffer, self.rows = self.buffer, {}, 0
        by_deployment: dict[tuple[str, str], list[tuple[str, _Rows]]] = {}
        for (project, deployment, version), rows in groups.items():
            by_deployment.setdefault((project, deployment), []).append((version, rows))
        keys = []
        for (project, deployment), items in by_deployment.items():
            out = io.BytesIO()
            for version, rows in items:
                line = {"at": rows.at, "version": version, "columns": rows.columns, "predictions": rows.predictions}
                out.write(orjson.dumps(line) + b"\n")
            day = datetime.now(UTC).strftime("%Y-%m-%d")
            key = f"capture/{project}/{deployment}/{day}/{int(time.time() * 1000)}-{uuid.uuid4().hex[:8]}.jsonl"
            tmp = Path(f"/tmp/miniml-capture-{uuid.uuid4().hex}.jsonl")  # noqa: S108
            try:
                tmp.write_bytes(out.getvalue())
                self.store.put_file(key, tmp)
                keys.append(key)
            except Exception as exc:  # storage down: the sample is lost, serving goes on
                log.warning("capture write failed", extra={"deployment": deployment, "error": str(exc)[:200]})
            finally:
                tmp.unlink(missing_ok=True)
        return keys
