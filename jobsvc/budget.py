"""Each user's share of the state dir's output: one user's jobs cannot fill the disk for everyone.

The capture adds what it stores and the retention takes off what it drops, so the check before each write is
one comparison. Over the share, a job's new output is dropped and counted as lost (its readers see the gap)
until retention has freed room by removing that user's own oldest ended jobs; nobody else's output is touched.
"""

from __future__ import annotations


class Budget:
    __slots__ = ("limit", "used", "warned")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self.warned = False

    @property
    def over(self) -> bool:
        return self.limit is not None and self.used > self.limit

    @property
    def excess(self) -> int:
        return 0 if self.limit is None else max(0, self.used - self.limit)
