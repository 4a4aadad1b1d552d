"""The job catalog: lookups and List pages by bisection, the same at any number of jobs."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from jobsvc.catalog import Catalog

T0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


@dataclass
class J:
    id: str
    owner: str
    started_at: dt.datetime
    status: str = "finished"


def make(n: int, owners: tuple[str, ...] = ("alice", "bob")) -> tuple[Catalog[J], list[J]]:
    jobs = [
        J(f"{random.getrandbits(64):016x}-{i}", owners[i % len(owners)], T0 + dt.timedelta(seconds=i)) for i in range(n)
    ]
    catalog: Catalog[J] = Catalog()
    for j in random.sample(jobs, len(jobs)):  # added in any order (a restart restores them so)
        catalog.add(j)
    return catalog, jobs


def pages(catalog: Catalog[J], owner: str | None, limit: int, **kw: object) -> list[list[J]]:
    out: list[list[J]] = []
    after = None
    while True:
        page, more = catalog.page(owner, after=after, limit=limit, **kw)  # type: ignore[arg-type]
        out.append(page)
        if not more:
            return out
        after = (page[-1].started_at, page[-1].id)


def test_pages_cover_every_job_once_in_start_order_per_owner_and_for_all() -> None:
    catalog, jobs = make(1001)
    assert [j for p in pages(catalog, None, 100) for j in p] == jobs
    assert [len(p) for p in pages(catalog, None, 100)] == [100] * 10 + [1]
    alice = [j for j in jobs if j.owner == "alice"]
    assert [j for p in pages(catalog, "alice", 7) for j in p] == alice
    assert [j for p in pages(catalog, "alice", 7, newest_first=True) for j in p] == alice[::-1]
    assert catalog.page("carol")[0] == []


def test_a_page_filters_and_starts_at_a_moment() -> None:
    catalog, jobs = make(50)
    for j in jobs[::3]:
        j.status = "running"
    running = [j for j in jobs if j.status == "running"]
    assert [j for p in pages(catalog, None, 4, keep=lambda j: j.status == "running") for j in p] == running
    since = T0 + dt.timedelta(seconds=40)
    assert [j for p in pages(catalog, None, 3, started_since=since) for j in p] == jobs[40:]
    assert [j for p in pages(catalog, None, 3, started_since=since, newest_first=True) for j in p] == jobs[40:][::-1]


def test_removal_and_prefixes() -> None:
    catalog, jobs = make(200)
    for j in jobs[:150]:
        catalog.remove(j)
    catalog.remove(jobs[0])  # twice: nothing happens
    assert len(catalog) == 50 and [j for p in pages(catalog, None, 9) for j in p] == jobs[150:]
    target = jobs[170]
    assert catalog.with_prefix(target.owner, target.id[:12]) == [target]
    assert catalog.with_prefix(target.owner, target.id[:12] + "zz") == []
    assert catalog.find("carol", target.id) is None and catalog.find(None, target.id) is target
    twins = J("abcd-1", "alice", T0), J("abcd-2", "alice", T0)  # the same start time: the id decides
    for t in twins:
        catalog.add(t)
    assert len(catalog.with_prefix("alice", "abcd")) == 2


def test_many_added_at_once_are_indexed_as_if_added_one_by_one() -> None:
    catalog, jobs = make(300, owners=("alice", "bob", "carol"))
    bulk: Catalog[J] = Catalog()
    bulk.add(jobs[5])  # some there already (an owner the bulk adds to, and one it does not)
    dave = J("dddd-0", "dave", T0 - dt.timedelta(seconds=1))
    bulk.add(dave)
    catalog.add(dave)
    bulk.extend(random.sample(jobs, len(jobs)))
    assert len(bulk) == len(catalog) == 301
    for owner in (None, "alice", "bob", "carol", "dave"):
        for newest_first in (False, True):
            want = [j for p in pages(catalog, owner, 13, newest_first=newest_first) for j in p]
            assert [j for p in pages(bulk, owner, 13, newest_first=newest_first) for j in p] == want
    assert [j for p in pages(bulk, "alice", 1000) for j in p] == [j for j in jobs if j.owner == "alice"]
    target = jobs[123]
    assert bulk.with_prefix(target.owner, target.id[:10]) == [target]
    assert bulk.with_prefix("bob" if target.owner != "bob" else "alice", target.id[:10]) == []
    for j in jobs[::2]:
        bulk.remove(j)
    assert [j for p in pages(bulk, None, 50) for j in p] == [dave, *jobs[1::2]]
    assert [j for p in pages(bulk, "carol", 50) for j in p] == [j for j in jobs[1::2] if j.owner == "carol"]
