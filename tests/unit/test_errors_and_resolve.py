"""Error mapping (one place) and id-prefix resolution, without a server."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from jobsvc.authz import Authz
from jobsvc.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from jobsvc.manager import JobManager
from jobsvc.server.interceptors import _map


class FakeContext:
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgumentError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFoundError("no such job"), grpc.StatusCode.NOT_FOUND),
        (FailedPreconditionError("later"), grpc.StatusCode.FAILED_PRECONDITION),
        (ResourceExhaustedError("quota"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (UnavailableError("closing"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_job_errors_map_to_their_status_with_their_message(error: Exception, code: grpc.StatusCode) -> None:
    outcome, status, message = _map(error, FakeContext(), "/jobsvc.v1.JobService/Get")  # type: ignore[arg-type]
    assert (outcome, status, message) == (code.name, code, str(error))


def test_unexpected_errors_become_a_generic_internal(caplog: pytest.LogCaptureFixture) -> None:
    secret = RuntimeError("/var/lib/jobsvc/secret path and internals")
    _, status, message = _map(secret, FakeContext(), "/jobsvc.v1.JobService/Start")  # type: ignore[arg-type]
    assert status == grpc.StatusCode.INTERNAL and message == "internal error"
    assert "secret path" not in message
    assert "Traceback" in caplog.text or caplog.records[0].exc_info is not None


def test_cancellation_passes_through() -> None:
    assert _map(asyncio.CancelledError(), FakeContext(), "m")[1] is None  # type: ignore[arg-type]


def make_manager(ids_by_owner: dict[str, list[str]], admins: frozenset[str] = frozenset()) -> JobManager:
    import datetime as dt

    from jobsvc.catalog import Catalog

    m = JobManager.__new__(JobManager)
    m._jobs = Catalog()
    t0 = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    for owner, ids in ids_by_owner.items():
        for n, i in enumerate(ids):
            m._jobs.add(SimpleNamespace(id=i, owner=owner, started_at=t0 + dt.timedelta(seconds=n)))  # type: ignore[arg-type]
    m._authz = Authz(admins)
    return m


def resolve(m: JobManager, owner: str, job_id: str) -> Any:
    return m._resolve(owner, job_id)


def test_prefix_resolution() -> None:
    m = make_manager({"alice": ["abcd1111-x", "abcd2222-y", "ffff0000-z"], "bob": ["abce9999-q"]})
    assert resolve(m, "alice", "abcd1111-x").id == "abcd1111-x"
    assert resolve(m, "alice", "abcd1").id == "abcd1111-x"
    assert resolve(m, "alice", "ffff").id == "ffff0000-z"
    with pytest.raises(InvalidArgumentError, match="ambiguous"):
        resolve(m, "alice", "abcd")
    with pytest.raises(NotFoundError):
        resolve(m, "alice", "fff")  # shorter than 4 characters
    with pytest.raises(NotFoundError):
        resolve(m, "alice", "abce")  # bob's job


def test_not_found_reads_the_same_for_any_id() -> None:
    m = make_manager({"bob": ["abce9999-q"]})
    messages = set()
    for job_id in ("abce9999-q", "00000000-0000", "zzzz", ""):
        with pytest.raises(NotFoundError) as e:
            resolve(m, "alice", job_id)
        messages.add(str(e.value))
    assert len(messages) == 1


def test_admins_resolve_every_job() -> None:
    m = make_manager({"alice": ["abcd1111-x"], "bob": ["ffff0000-z"]}, admins=frozenset({"CN=ops"}))
    assert resolve(m, "CN=ops", "abcd").id == "abcd1111-x"
    assert resolve(m, "CN=ops", "ffff0000-z").id == "ffff0000-z"
    with pytest.raises(NotFoundError):
        resolve(m, "alice", "ffff")
    assert Authz(frozenset({"CN=ops"})).may_act_on("CN=ops", "bob")
    assert not Authz(frozenset({"CN=ops"})).may_act_on("alice", "bob")
