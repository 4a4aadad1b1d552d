"""The jobs a server knows, indexed so that a lookup or a page costs the same at 50 jobs or 50,000.

Per owner (and for all, for admins): a dict by id, ids kept sorted (a prefix lookup is a bisection), and
(started_at, id) keys kept sorted (a page of List starts with a bisection, never a sort of everything). A page
with a filter (a status) walks on until it has found its jobs: with few matches among many jobs, that is a scan.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar


class Entry(Protocol):
    id: str
    owner: str
    started_at: dt.datetime


E = TypeVar("E", bound=Entry)
Key = tuple[dt.datetime, str]


class _Index(Generic[E]):
    def __init__(self) -> None:
        self.by_id: dict[str, E] = {}
        self.ids: list[str] = []
        self.order: list[Key] = []

    def add(self, e: E) -> None:
        self.by_id[e.id] = e
        bisect.insort(self.ids, e.id)
        key = (e.started_at, e.id)
        if not self.order or self.order[-1] < key:
            self.order.append(key)  # the usual case: jobs arrive in the order they started
        else:
            bisect.insort(self.order, key)

    def remove(self, e: E) -> None:
        if self.by_id.pop(e.id, None) is None:
            return
        del self.ids[bisect.bisect_left(self.ids, e.id)]
        del self.order[bisect.bisect_left(self.order, (e.started_at, e.id))]


class Catalog(Generic[E]):
    def __init__(self) -> None:
        self._all: _Index[E] = _Index()
        self._owners: dict[str, _Index[E]] = {}

    def __len__(self) -> int:
        return len(self._all.by_id)

    def __iter__(self) -> Iterator[E]:
        return iter(self._all.by_id.values())

    def get(self, job_id: str) -> E | None:
        return self._all.by_id.get(job_id)

    def add(self, e: E) -> None:
        self._all.add(e)
        self._owners.setdefault(e.owner, _Index()).add(e)

    def extend(self, entries: list[E]) -> None:
        """Add many at once, as a restart does: all the ids sorted once and all the start keys once; each owner's
        lists are those in order, holding the same key tuples (a sort per owner too was a third of the time)."""
        every, owners = self._all, self._owners
        touched: dict[str, _Index[E]] = {}
        for e in entries:
            every.by_id[e.id] = e
            owned = touched.get(e.owner)
            if owned is None:
                owned = touched[e.owner] = owners.setdefault(e.owner, _Index())
            owned.by_id[e.id] = e
        every.ids = sorted(every.by_id)
        every.order = sorted([(e.started_at, e.id) for e in every.by_id.values()])
        by_id = every.by_id
        ids: dict[str, list[str]] = {owner: [] for owner in touched}
        order: dict[str, list[Key]] = {owner: [] for owner in touched}
        for job_id in every.ids:
            owned_ids = ids.get(by_id[job_id].owner)
            if owned_ids is not None:
                owned_ids.append(job_id)
        for key in every.order:
            owned_order = order.get(by_id[key[1]].owner)
            if owned_order is not None:
                owned_order.append(key)
        for owner, owned in touched.items():
            owned.ids, owned.order = ids[owner], order[owner]

    def remove(self, e: E) -> None:
        self._all.remove(e)
        owned = self._owners.get(e.owner)
        if owned is not None:
            owned.remove(e)
            if not owned.by_id:
                del self._owners[e.owner]

    def _scope(self, owner: str | None) -> _Index[E]:
        return self._all if owner is None else self._owners.get(owner) or _Index()

    def find(self, owner: str | None, job_id: str) -> E | None:
        """By full id, among owner's jobs (all jobs for None)."""
        return self._scope(owner).by_id.get(job_id)

    def with_prefix(self, owner: str | None, prefix: str, most: int = 2) -> list[E]:
        """Up to `most` of owner's jobs whose id starts with prefix (two tell ambiguity apart)."""
        index = self._scope(owner)
        i = bisect.bisect_left(index.ids, prefix)
        found: list[E] = []
        while i < len(index.ids) and len(found) < most and index.ids[i].startswith(prefix):
            found.append(index.by_id[index.ids[i]])
            i += 1
        return found

    def page(
        self,
        owner: str | None,
        after: Key | None = None,
        newest_first: bool = False,
        started_since: dt.datetime | None = None,
        keep: Callable[[E], bool] = lambda e: True,
        limit: int = 500,
    ) -> tuple[list[E], bool]:
        """Up to limit of owner's jobs past `after` in start order (or newest first), those keep() accepts and
        started at or after started_since; and whether more follow."""
        index = self._scope(owner)
        order = index.order
        if newest_first:
            hi = len(order) if after is None else bisect.bisect_left(order, after)
            lo = 0 if started_since is None else bisect.bisect_left(order, (started_since, ""))
            positions: range = range(hi - 1, lo - 1, -1)
        else:
            lo = 0 if after is None else bisect.bisect_right(order, after)
            if started_since is not None:
                lo = max(lo, bisect.bisect_left(order, (started_since, "")))
            positions = range(lo, len(order))
        found: list[E] = []
        for i in positions:
            e = index.by_id[order[i][1]]
            if keep(e):
                if len(found) == limit:
                    return found, True
                found.append(e)
        return found, False
