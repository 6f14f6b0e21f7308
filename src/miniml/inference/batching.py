"""Micro-batching: concurrent requests for one model share one predict call.

No request waits for a timer. While a batch is being predicted on the model's thread, new
requests queue; the next batch takes all of them at once. Under no load a request goes
straight through; under load the per-call overhead (for a random forest, most of the cost) is
paid once per batch instead of once per request.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sklearn

from miniml.inference.fastpath import Transform

# A request's inputs, per column: a float array for number columns, a list of values otherwise.
Columns = dict[str, np.ndarray | list[Any]]


def _serving_thread() -> None:
    # Inputs are checked before they reach the model (types, and no infinities: null is NaN for the
    # imputer), so scikit-learn's own finiteness scan of every call is skipped. Thread-local.
    sklearn.set_config(assume_finite=True)


@dataclass
class _Item:
    columns: Columns
    rows: int
    proba: bool
    future: asyncio.Future[tuple[np.ndarray, np.ndarray | None]] = field(repr=False)


class Batcher:
    def __init__(
        self, model: Any, names: list[str], *, max_rows: int, fast: tuple[Transform, Any] | None = None
    ) -> None:
        self.model = model
        self.names = names
        # A numpy form of the preprocessing and the estimator behind it (inference/fastpath.py).
        self.fast = fast
        self.max_rows = max_rows
        # None wakes the loop up to see that it is closing.
        self.queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self.executor: ThreadPoolExecutor | None = None
        self.task: asyncio.Task[None] | None = None
        self.closing = False

    def start(self) -> None:
        # Also after close(): a request that picked this model just before a swap still gets its
        # answer from it (the loop runs again until its queue is empty).
        if self.task is None or self.task.done():
            if self.executor is None:
                # One thread per model: predict never blocks the event loop, and calls stay ordered.
                self.executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="predict", initializer=_serving_thread
                )
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def predict(self, columns: Columns, rows: int, proba: bool) -> tuple[np.ndarray, np.ndarray | None]:
        self.start()
        future: asyncio.Future[tuple[np.ndarray, np.ndarray | None]] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Item(columns, rows, proba, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not (self.closing and self.queue.empty()):
                first = await self.queue.get()
                items = [first] if first is not None else []
                total = first.rows if first is not None else 0
                while not self.queue.empty() and total < self.max_rows:
                    item = self.queue.get_nowait()
                    if item is not None:
                        items.append(item)
                        total += item.rows
                if items:
                    await self._answer(loop, items)
        finally:
            # Every request that reached the queue was answered; the thread goes with the loop.
            if self.executor is not None:
                self.executor.shutdown(wait=False)
                self.executor = None

    async def _answer(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        try:
            preds, probas = await loop.run_in_executor(self.executor, self._predict, items)
        except Exception as exc:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        offset = 0
        for item in items:
            end = offset + item.rows
            part = probas[offset:end] if probas is not None and item.proba else None
            if not item.future.done():
                item.future.set_result((preds[offset:end], part))
            offset = end

    def _predict(self, items: list[_Item]) -> tuple[np.ndarray, np.ndarray | None]:
        if len(items) == 1:
            data = items[0].columns
        else:
            data = {name: _concat([item.columns[name] for item in items]) for name in self.names}
        model: Any
        if self.fast is not None:
            transform, model = self.fast
            x: Any = transform(data)  # type: ignore[arg-type]  # number columns only: all arrays
        else:
            model, x = self.model, pd.DataFrame(data, columns=self.names, copy=False)
        preds = np.asarray(model.predict(x))
        probas = None
        if any(item.proba for item in items) and hasattr(model, "predict_proba"):
            probas = np.asarray(model.predict_proba(x))
        return preds, probas

    def close(self) -> None:
        """Stop once every queued request is answered (requests holding this model finish on it)."""
        self.closing = True
        if self.task is not None and not self.task.done():
            self.queue.put_nowait(None)
        elif self.executor is not None:
            self.executor.shutdown(wait=False)
            self.executor = None


def _concat(parts: list[np.ndarray | list[Any]]) -> np.ndarray | list[Any]:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)  # type: ignore[arg-type]
    return [v for part in parts for v in part]
