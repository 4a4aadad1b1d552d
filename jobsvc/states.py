"""Job status and the edges a job may take between them."""

from __future__ import annotations

import enum


class JobStatus(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"  # ended by a stop request
    FINISHED = "finished"  # ended by itself, including a kill by the kernel (OOM)

    @property
    def ended(self) -> bool:
        return self is not JobStatus.RUNNING


_EDGES: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.RUNNING: frozenset({JobStatus.STOPPED, JobStatus.FINISHED}),
    JobStatus.STOPPED: frozenset(),
    JobStatus.FINISHED: frozenset(),
}


class TransitionError(RuntimeError):
    """An illegal status change: always a bug in jobsvc, never a client's fault."""


def check_transition(old: JobStatus, new: JobStatus) -> None:
    """Raise TransitionError unless old -> new is an allowed edge."""
    if new not in _EDGES[old]:
        raise TransitionError(f"illegal job status change {old.value} -> {new.value}")
