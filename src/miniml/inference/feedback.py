"""Recent predictions of one replica process, so true labels sent later can be joined with them.

Each response carries one id per row, ``<process>.<request>.<row>``. The replica remembers the
newest ``max_rows`` predicted rows (oldest forgotten first); feedback for a forgotten or foreign id
answers 404, naming it. Joined pairs go to the api, which keeps them and computes live quality.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from miniml.errors import NotFound
from miniml.schemas.monitoring import FeedbackBatch, FeedbackRecord

# (deployment, version, predicted values, Unix time): a plain tuple, few objects for the collector.
_Served = tuple[str, str, tuple[Any, ...], float]


class PredictionMemory:
    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.tag = uuid.uuid4().hex[:8]  # this process: ids of a restarted replica never collide
        self._next = itertools.count(1)
        self._items: OrderedDict[str, _Served] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()

    def remember(self, deployment: str, version: str, values: list[Any]) -> list[str] | None:
        """Keep a response's predictions; return their ids (None when remembering is off)."""
        if self.max_rows <= 0:
            return None
        base = f"{self.tag}.{next(self._next)}"
        with self._lock:
            # Tuples of atoms only: untracked by the garbage collector after its first pass, so
            # thousands of remembered predictions do not lengthen its pauses.
            self._items[base] = (deployment, version, tuple(values), time.time())
            self._rows += len(values)
            while self._rows > self.max_rows and self._items:
                _, old = self._items.popitem(last=False)
                self._rows -= len(old[2])
        return [f"{base}.{i}" for i in range(len(values))]

    def join(self, deployment: str, batch: FeedbackBatch) -> list[FeedbackRecord]:
        """Each label with its prediction; raises NotFound (and joins nothing) if any id is unknown."""
        out, unknown = [], []
        for item in batch.feedback:
            base, _, row = item.prediction_id.rpartition(".")
            served = self._items.get(base)
            if served is None or served[0] != deployment or not row.isdigit() or int(row) >= len(served[2]):
                unknown.append(item.prediction_id)
                continue
            out.append(
                FeedbackRecord(
                    deployment=deployment,
                    prediction_id=item.prediction_id,
                    version=served[1],
                    predicted=served[2][int(row)],
                    label=item.label,
                    predicted_at=datetime.fromtimestamp(served[3], UTC),
                )
            )
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5]) + (
                f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            )
            raise NotFound(
                f"No recent prediction of {deployment!r} has id {shown}; nothing was stored. Send the ids a "
                "prediction response gave, to the replica that served it, while it still remembers them "
                "(monitoring.prediction_memory_rows)."
            )
        return out
