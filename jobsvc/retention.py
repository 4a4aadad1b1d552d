"""Which ended jobs retention removes: a selection over the ended jobs kept in the order they ended.

Three policies, as the server's options set them: no ended job older than keep_seconds, at most keep_per_user
ended jobs per user, and all output together at most max_total_bytes (the oldest ended jobs go first). Choosing
costs what is chosen, not what is kept: the janitor runs this every 2 s on the event loop, and sorting 50,000
kept jobs there held every call 80-100 ms.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Ended(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def owner(self) -> str: ...

    @property
    def ended_at(self) -> dt.datetime | None: ...

    @property
    def output_bytes(self) -> int:
        """The output it keeps on disk."""
        ...


E = TypeVar("E", bound=Ended)


@dataclass(frozen=True)
class Policy:
    keep_seconds: float | None = None
    keep_per_user: int | None = None
    max_total_bytes: int | None = None


class EndedJobs(Generic[E]):
    """The ended jobs, oldest ended first, overall and per owner, with the output they keep in all."""

    def __init__(self) -> None:
        self._order: dict[str, E] = {}  # insertion order is end order
        self._owners: dict[str, dict[str, E]] = {}
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._order)

    def add(self, job: E) -> None:
        """A job that has ended (restored ones in the order they ended)."""
        if job.id in self._order:
            return
        self._order[job.id] = job
        self._owners.setdefault(job.owner, {})[job.id] = job
        self.total_bytes += job.output_bytes

    def extend(self, jobs: Iterable[E]) -> None:
        """add() for each of jobs, in that order (a restart's 50,000, oldest ended first)."""
        order, owners = self._order, self._owners
        total = 0
        for job in jobs:
            if job.id in order:
                continue
            order[job.id] = job
            owned = owners.get(job.owner)
            if owned is None:
                owned = owners[job.owner] = {}
            owned[job.id] = job
            total += job.output_bytes
        self.total_bytes += total

    def discard(self, job: E) -> None:
        if self._order.pop(job.id, None) is None:
            return
        owned = self._owners[job.owner]
        del owned[job.id]
        if not owned:
            del self._owners[job.owner]
        self.total_bytes -= job.output_bytes

    def select(
        self, policy: Policy, now: dt.datetime, live_bytes: int = 0, user_excess: Mapping[str, int] | None = None
    ) -> list[E]:
        """The jobs the policy removes now, oldest ended first. live_bytes: what running jobs keep; user_excess:
        how far over their share of the output each user is (their oldest ended jobs go until it fits)."""
        doomed: dict[str, E] = {}
        for owner, excess in (user_excess or {}).items():
            for job in self._owners.get(owner, {}).values():
                if excess <= 0:
                    break
                doomed[job.id] = job
                excess -= job.output_bytes
        if policy.keep_seconds is not None:
            cutoff = now - dt.timedelta(seconds=policy.keep_seconds)
            for job in self._order.values():
                if job.ended_at is None or job.ended_at >= cutoff:
                    break
                doomed[job.id] = job
        if policy.keep_per_user is not None:
            for owned in self._owners.values():
                over = len(owned) - policy.keep_per_user
                for job in owned.values():
                    if over <= 0:
                        break
                    doomed[job.id] = job
                    over -= 1
        if policy.max_total_bytes is not None:
            total = self.total_bytes + live_bytes - sum(j.output_bytes for j in doomed.values())
            for job in self._order.values():
                if total <= policy.max_total_bytes:
                    break
                if job.id not in doomed:
                    doomed[job.id] = job
                    total -= job.output_bytes
        return list(doomed.values())
