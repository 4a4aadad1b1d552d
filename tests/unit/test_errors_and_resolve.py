"""Error mapping (one place) and id-prefix resolution and scope (an engine over fakes), without a server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from jobsvc.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from jobsvc.server.interceptors import _map
from tests.unit.fakes import Engine, make_engine


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


async def make_manager(
    tmp_path: Path, ids_by_owner: dict[str, list[str]], admins: frozenset[str] = frozenset()
) -> Engine:
    """An engine over fakes holding a running job of each id (in this order)."""
    e = make_engine(tmp_path, admins=admins)
    await e.manager.reconcile()
    for owner, ids in ids_by_owner.items():
        e.ids.extend(ids)
        for _ in ids:
            await e.manager.start(owner, ["job"])
    return e


@pytest.fixture
async def engines() -> AsyncIterator[list[Engine]]:
    made: list[Engine] = []
    yield made
    for e in made:
        await e.manager.shutdown(grace=0)


def resolve(e: Engine, owner: str, job_id: str) -> str:
    return e.manager.get(owner, job_id).id


async def test_prefix_resolution(tmp_path: Path, engines: list[Engine]) -> None:
    m = await make_manager(tmp_path, {"alice": ["abcd1111-x", "abcd2222-y", "ffff0000-z"], "bob": ["abce9999-q"]})
    engines.append(m)
    assert resolve(m, "alice", "abcd1111-x") == "abcd1111-x"
    assert resolve(m, "alice", "abcd1") == "abcd1111-x"
    assert resolve(m, "alice", "ffff") == "ffff0000-z"
    with pytest.raises(InvalidArgumentError, match="ambiguous"):
        resolve(m, "alice", "abcd")
    with pytest.raises(NotFoundError):
        resolve(m, "alice", "fff")  # shorter than 4 characters
    with pytest.raises(NotFoundError):
        resolve(m, "alice", "abce")  # bob's job
    with pytest.raises(NotFoundError):
        await m.manager.stop("alice", "abce9999-q")  # nor can alice act on it
    assert m.group("abce9999-q").signals == []


async def test_not_found_reads_the_same_for_any_id(tmp_path: Path, engines: list[Engine]) -> None:
    m = await make_manager(tmp_path, {"bob": ["abce9999-q"]})
    engines.append(m)
    messages = set()
    for job_id in ("abce9999-q", "00000000-0000", "zzzz", ""):
        with pytest.raises(NotFoundError) as e:
            resolve(m, "alice", job_id)
        messages.add(str(e.value))
    assert len(messages) == 1


async def test_admins_resolve_and_act_on_every_job(tmp_path: Path, engines: list[Engine]) -> None:
    m = await make_manager(tmp_path, {"alice": ["abcd1111-x"], "bob": ["ffff0000-z"]}, admins=frozenset({"CN=ops"}))
    engines.append(m)
    assert resolve(m, "CN=ops", "abcd") == "abcd1111-x"
    assert resolve(m, "CN=ops", "ffff0000-z") == "ffff0000-z"
    assert [r.id for r in m.manager.list("CN=ops")] == ["abcd1111-x", "ffff0000-z"]
    with pytest.raises(NotFoundError):
        resolve(m, "alice", "ffff")
    stopped = await m.manager.stop("CN=ops", "ffff")
    assert (stopped.owner, stopped.reason) == ("bob", "stopped by owner")
