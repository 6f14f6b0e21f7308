"""A swap closes the old model's batcher while requests that picked it are still queued: every
one of them is answered (they used to wait forever, until the client gave up)."""

from __future__ import annotations

import asyncio

import numpy as np
from sklearn.linear_model import LogisticRegression

from miniml.inference.batching import Batcher


def test_closing_a_batcher_answers_every_request_already_holding_it() -> None:
    import pandas as pd

    x = pd.DataFrame(np.random.default_rng(0).normal(size=(200, 2)), columns=["a", "b"])
    model = LogisticRegression().fit(x, (x["a"] > 0).astype(int))

    async def scenario() -> None:
        batcher = Batcher(model, ["a", "b"], max_rows=4)
        columns = {"a": np.array([1.0]), "b": np.array([0.0])}
        pending = [asyncio.ensure_future(batcher.predict(columns, 1, False)) for _ in range(40)]
        await asyncio.sleep(0)  # they are queued (and the first batch is on the model's thread)
        batcher.close()
        answers = await asyncio.wait_for(asyncio.gather(*pending), timeout=10)
        assert [int(p[0]) for p, _ in answers] == [1] * 40
        # A request that picked the model just before the swap and arrives after close: answered too.
        late, _ = await asyncio.wait_for(batcher.predict(columns, 1, False), timeout=10)
        assert int(late[0]) == 1
        await asyncio.sleep(0.1)
        assert batcher.task is not None and batcher.task.done() and batcher.executor is None

    asyncio.run(scenario())
