"""Each user's share of the state dir's output: one user's jobs cannot fill the disk for everyone.

The capture adds what it stores and the retention takes off what it drops, so the check before each write is
one comparison. Over the share, that user's own oldest ended jobs are removed at once; if that is not enough
(their running jobs hold it), a job's new output is dropped and counted as lost (its readers see the gap).
Nobody else's output is touched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Budget:
    """used is what the event loop has settled (it alone changes it); capture threads add what they store to a
    pending count under a lock, and the loop settles it (settle(), full()). over and excess count both."""

    __slots__ = ("_lock", "_pending", "limit", "reclaim", "used")

    def __init__(self, limit: int | None, reclaim: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.used = 0
        self.reclaim = reclaim  # removes this user's oldest ended jobs until the share fits, if it can
        self._pending = 0
        self._lock = threading.Lock()

    def captured(self, n: int) -> None:
        """n more bytes stored (from a capture thread)."""
        with self._lock:
            self._pending += n

    def settle(self) -> None:
        """Count what capture threads stored in used (on the loop)."""
        with self._lock:
            self.used += self._pending
            self._pending = 0

    def full(self) -> bool:
        """Over the share even after removing what retention may remove of this user's: new output is dropped."""
        self.settle()
        if not self.over:
            return False
        if self.reclaim is not None:
            self.reclaim()
        return self.over

    def _total(self) -> int:
        with self._lock:
            return self.used + self._pending

    @property
    def over(self) -> bool:
        return self.limit is not None and self._total() > self.limit

    @property
    def excess(self) -> int:
        return 0 if self.limit is None else max(0, self._total() - self.limit)
