from __future__ import annotations

import pytest

from jobsvc.errors import ResourceExhaustedError
from jobsvc.quota import Quota


def test_take_counts_per_user_and_in_total_and_names_the_quota() -> None:
    q = Quota("running jobs", per_user=2, total=3)
    q.take("alice")
    q.take("alice")
    with pytest.raises(ResourceExhaustedError, match="at most 2 running jobs per user"):
        q.take("alice")
    q.take("bob")
    with pytest.raises(ResourceExhaustedError, match="at most 3 running jobs on this server"):
        q.take("carol")
    assert (q.held("alice"), q.held("bob"), q.held("carol"), q.total) == (2, 1, 0, 3)


def test_give_back_frees_the_slot_and_refuses_one_never_taken() -> None:
    q = Quota("concurrent streams", per_user=1)
    q.take("alice")
    q.give_back("alice")
    assert (q.held("alice"), q.total) == (0, 0)
    q.take("alice")  # usable again
    q.give_back("alice")
    with pytest.raises(RuntimeError):
        q.give_back("alice")
