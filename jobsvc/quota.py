"""Quota: slots held per user against a per-user and a total limit, checked and taken in one step."""

from __future__ import annotations

from jobsvc.errors import ResourceExhaustedError


class Quota:
    """take() checks and counts in one synchronous step, so no await can fall between the two (on one event loop
    that is what makes a quota exact under any number of concurrent calls); every take() needs one give_back()."""

    def __init__(self, what: str, per_user: int, total: int | None = None) -> None:
        self._what = what
        self._per_user = per_user
        self._total_limit = total
        self._held: dict[str, int] = {}
        self.total = 0

    def held(self, owner: str) -> int:
        return self._held.get(owner, 0)

    def take(self, owner: str) -> None:
        """One slot for owner, or ResourceExhaustedError naming the quota."""
        if self.held(owner) >= self._per_user:
            raise ResourceExhaustedError(f"quota: at most {self._per_user} {self._what} per user")
        if self._total_limit is not None and self.total >= self._total_limit:
            raise ResourceExhaustedError(f"quota: at most {self._total_limit} {self._what} on this server")
        self._held[owner] = self.held(owner) + 1
        self.total += 1

    def give_back(self, owner: str) -> None:
        held = self.held(owner)
        if held <= 0:
            raise RuntimeError(f"quota {self._what}: {owner} gave back a slot it did not hold")
        if held == 1:
            del self._held[owner]  # users who hold nothing cost nothing
        else:
            self._held[owner] = held - 1
        self.total -= 1
