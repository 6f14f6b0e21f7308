"""Job states.

    queued ──► running ──► succeeded
      │           ├──────► failed      (an error, a bad dataset, or no heartbeat for too long)
      │           └──────► cancelled   (cancel requested; its trials are killed within a heartbeat)
      ├──► cancelled                   (cancelled before any worker took it)
      └──► failed                      (could never be run)

Terminal states never change again. The api owns the state; workers ask it to move.
"""

from __future__ import annotations

from enum import StrEnum

from miniml.errors import Conflict


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


ALLOWED: dict[JobState, set[JobState]] = {
    JobState.queued: {JobState.running, JobState.cancelled, JobState.failed},
    JobState.running: {JobState.succeeded, JobState.failed, JobState.cancelled},
    JobState.succeeded: set(),
    JobState.failed: set(),
    JobState.cancelled: set(),
}


def check_transition(job_id: int, current: JobState, new: JobState) -> None:
    if new not in ALLOWED[current]:
        raise Conflict(f"Job {job_id} is {current.value}; it cannot become {new.value}.")
