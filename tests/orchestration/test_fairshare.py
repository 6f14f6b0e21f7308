"""A shard of a parallel job claims its share of the budget first, then what is left."""

from __future__ import annotations

import threading
import time

from miniml.orchestration.runner import FairShare


class Budget:
    """The api's claim counter (services.jobs.claim_trial), shared by the shards."""

    def __init__(self, total: int) -> None:
        self.total, self.claimed, self.lock = total, 0, threading.Lock()

    def claim(self) -> bool:
        with self.lock:
            if self.claimed >= self.total:
                return False
            self.claimed += 1
            return True

    def left(self) -> int:
        return self.total - self.claimed


def shard(budget: Budget, grace_s: float) -> FairShare:
    return FairShare(
        budget.claim, left=budget.left, budget=budget.total, shards=2, grace_s=grace_s, stop=lambda: False, poll_s=0.02
    )


def test_a_shard_leaves_the_others_share_while_they_start() -> None:
    budget = Budget(10)
    first = shard(budget, grace_s=5)
    assert [first() for _ in range(5)] == [True] * 5
    late = shard(budget, grace_s=5)
    # The first shard has its share: its next claim waits; the late shard takes the other five.
    waiter = threading.Thread(target=lambda: results.append(first()))
    results: list[bool] = []
    waiter.start()
    time.sleep(0.1)
    assert results == [] and budget.claimed == 5
    assert [late() for _ in range(5)] == [True] * 5
    waiter.join(2)
    assert results == [False]  # budget used up: the waiting shard stops at once, not after the grace


def test_a_shard_that_never_comes_does_not_strand_the_budget() -> None:
    budget = Budget(10)
    alone = shard(budget, grace_s=0.3)
    start = time.monotonic()
    granted = 0
    while alone():
        granted += 1
    assert granted == 10 and budget.claimed == 10
    assert time.monotonic() - start >= 0.3  # it waited for the grace period, then took the rest


def test_one_shard_or_no_trial_budget_claims_freely() -> None:
    budget = Budget(4)
    single = FairShare(budget.claim, left=budget.left, budget=4, shards=1, grace_s=60, stop=lambda: False)
    assert [single() for _ in range(5)] == [True] * 4 + [False]
    timed = FairShare(lambda: True, left=lambda: None, budget=None, shards=3, grace_s=60, stop=lambda: False)
    assert all(timed() for _ in range(20))
