"""A bounded sample of inputs and predictions per deployment, written to the object store.

Adding to the buffer costs a list append on the request path; serialising and writing happen
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
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter

from miniml.inference.batching import Columns
from miniml.storage import ObjectStore

log = logging.getLogger("miniml.inference")


# (at, project, deployment, version, columns, predictions). A plain tuple of atoms, float arrays
# and a dict of them: the collector stops tracking it after a pass or two, so a full buffer adds
# nothing to the collections that pause requests (a NamedTuple would stay tracked).
_Sample = tuple[float, str, str, str, Columns, tuple[Any, ...]]


class Capture:
    def __init__(
        self, store: ObjectStore, replica: str, *, fraction: float, max_rows: int, registry: CollectorRegistry
    ) -> None:
        self.store, self.replica, self.fraction, self.max_rows = store, replica, fraction, max_rows
        self.buffer: list[_Sample] = []
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
            self.buffer.append((time.time(), project, deployment, version, columns, tuple(predictions)))
            self.rows += n
        self.captured.labels(deployment).inc(n)

    def flush(self) -> list[str]:
        """Write what is buffered, one JSON-lines object per deployment; return the keys written."""
        with self.lock:
            samples, self.buffer, self.rows = self.buffer, [], 0
        groups: dict[tuple[str, str], list[_Sample]] = {}
        for sample in samples:
            groups.setdefault((sample[1], sample[2]), []).append(sample)
        keys = []
        for (project, deployment), items in groups.items():
            out = io.BytesIO()
            for line in _merged(items):
                out.write(orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
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


def _merged(items: list[_Sample]) -> Iterator[dict[str, Any]]:
    """One line per model version, its rows joined column by column.

    The joins are numpy concatenations and C-level chains, and each line is one orjson call: the
    flush thread holds the GIL for a few short stretches instead of a Python loop per request,
    which would delay the event loop's requests (a thread that computes takes the GIL at every
    system call the loop makes).
    """
    by_version: dict[str, list[_Sample]] = {}
    for sample in items:
        by_version.setdefault(sample[3], []).append(sample)
    for version, group in by_version.items():
        names = list(group[0][4])
        columns: dict[str, Any] = {}
        for name in names:
            parts = [cols.get(name, [None] * len(preds)) for *_, cols, preds in group]
            if all(isinstance(p, np.ndarray) for p in parts):
                columns[name] = np.concatenate(parts)  # type: ignore[arg-type]
            else:
                columns[name] = list(chain.from_iterable(parts))
        yield {
            "at": group[-1][0],
            "version": version,
            "columns": columns,
            "predictions": list(chain.from_iterable(preds for *_, preds in group)),
        }
