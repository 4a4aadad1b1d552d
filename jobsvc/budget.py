"""Each user's share of the state dir's output: one user's jobs cannot fill the disk for everyone.

The capture adds what it stores and the retention takes off what it drops, so the check before each write is
one comparison. Over the share, that user's own oldest ended jobs are removed at once; if that is not enough
(their running jobs hold it), a job's new output is dropped and counted as lost (its readers see the gap).
Nobody else's output is touched.
"""

from __future__ import annotations

from collections.abc import Callable


class Budget:
    __slots__ = ("limit", "reclaim", "used")

    def __init__(self, limit: int | None, reclaim: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.reclaim = reclaim  # removes this user's oldest ended jobs until the share fits, if it can

    def full(self) -> bool:
        """Over the share even after removing what retention may remove of this user's: new output is dropped."""
        if not self.over:
            return False
        if self.reclaim is not None:
            self.reclaim()
        return self.over

    @property
    def over(self) -> bool:
        return self.limit is not None and self.used > self.limit

    @property
    def excess(self) -> int:
        return 0 if self.limit is None else max(0, self.used - self.limit)
