"""Retention's choice: pure, over ended jobs in the order they ended (the deleting is the manager's)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from jobsvc.retention import EndedJobs, Policy

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


@dataclass
class J:
    id: str
    owner: str
    ended_at: dt.datetime | None
    output_bytes: int = 0


def kept(*jobs: J) -> EndedJobs[J]:
    e: EndedJobs[J] = EndedJobs()
    for j in jobs:
        e.add(j)
    return e


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def test_age_removes_only_what_is_older_than_the_limit() -> None:
    jobs = [J(f"j{i}", "alice", ago(100 - i)) for i in range(10)]  # ended 100 s .. 91 s ago
    e = kept(*jobs)
    assert e.select(Policy(keep_seconds=95.5), NOW) == jobs[:5]
    assert e.select(Policy(keep_seconds=1000), NOW) == []
    assert e.select(Policy(), NOW) == []


def test_per_user_count_keeps_each_users_newest() -> None:
    a = [J(f"a{i}", "alice", ago(50 - i)) for i in range(5)]
    b = [J(f"b{i}", "bob", ago(40 - i)) for i in range(2)]
    e = kept(a[0], b[0], a[1], a[2], b[1], a[3], a[4])
    assert e.select(Policy(keep_per_user=3), NOW) == a[:2]  # bob has only 2
    assert sorted(j.id for j in e.select(Policy(keep_per_user=1), NOW)) == ["a0", "a1", "a2", "a3", "b0"]


def test_total_output_removes_the_oldest_ended_until_it_fits_counting_running_jobs() -> None:
    jobs = [J(f"j{i}", "alice" if i % 2 else "bob", ago(10 - i), output_bytes=100) for i in range(6)]
    e = kept(*jobs)
    assert e.total_bytes == 600
    assert e.select(Policy(max_total_bytes=600), NOW) == []
    assert e.select(Policy(max_total_bytes=450), NOW) == jobs[:2]
    assert e.select(Policy(max_total_bytes=450), NOW, live_bytes=200) == jobs[:4]  # running jobs' output counts
    # what the other policies already remove counts as freed
    assert e.select(Policy(keep_seconds=8.5, max_total_bytes=450), NOW) == jobs[:2]


def test_discard_and_totals() -> None:
    jobs = [J(f"j{i}", "alice", ago(5 - i), output_bytes=10) for i in range(3)]
    e = kept(*jobs)
    e.add(jobs[0])  # twice: counted once
    assert (len(e), e.total_bytes) == (3, 30)
    e.discard(jobs[0])
    e.discard(jobs[0])
    assert (len(e), e.total_bytes) == (2, 20)
    assert e.select(Policy(keep_per_user=1), NOW) == [jobs[1]]


def test_many_added_at_once_are_kept_as_if_added_one_by_one() -> None:
    jobs = [J(f"j{i}", ("alice", "bob", "carol")[i % 3], ago(100 - i), output_bytes=i) for i in range(30)]
    one_by_one = kept(*jobs)
    bulk = kept(jobs[0])  # one there already: not counted twice
    bulk.extend([*jobs, jobs[4]])
    assert len(bulk) == len(one_by_one) == 30 and bulk.total_bytes == one_by_one.total_bytes == sum(range(30))
    for policy in (Policy(keep_per_user=4), Policy(keep_seconds=80.5), Policy(max_total_bytes=300)):
        assert bulk.select(policy, NOW) == one_by_one.select(policy, NOW)
    assert bulk.select(Policy(), NOW, user_excess={"bob": 10}) == one_by_one.select(
        Policy(), NOW, user_excess={"bob": 10}
    )
