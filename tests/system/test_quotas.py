"""Quotas under load: many concurrent calls over real grpc.aio connections, cancelled calls, dead clients."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc import aio

from jobsvc._pb import jobs_pb2 as pb
from jobsvc._pb import jobs_pb2_grpc
from tests.system.server import Pki, Server, bound, start_server

SLEEP = pb.StartRequest(argv=[b"sleep", b"1000"])
Outcome = str | grpc.StatusCode  # a started job's id, or the call's status


@pytest.fixture
def quota_server(tmp_path: Path, keys: Pki) -> Iterator[Server]:
    srv = start_server(
        tmp_path, keys, "--max-running-per-user", "12", "--max-running-total", "20", "--max-streams-per-user", "8"
    )
    yield srv
    assert srv.stop() == 0, srv.log()
    shutil.rmtree(srv.work_root, ignore_errors=True)


@asynccontextmanager
async def aio_stub(server: Server, user: str) -> AsyncIterator[jobs_pb2_grpc.JobServiceStub]:
    keys = server.pki
    creds = grpc.ssl_channel_credentials(
        keys.ca.read_bytes(), keys.key(user).read_bytes(), keys.cert(user).read_bytes()
    )
    async with aio.secure_channel(server.target, creds) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        yield jobs_pb2_grpc.JobServiceStub(channel)


async def start_many(stub: jobs_pb2_grpc.JobServiceStub, n: int, request: pb.StartRequest = SLEEP) -> list[Outcome]:
    async def one() -> Outcome:
        try:
            return str((await stub.Start(request, timeout=120)).id)
        except aio.AioRpcError as e:
            return e.code()

    return list(await asyncio.gather(*(one() for _ in range(n))))


def started(outcomes: list[Outcome]) -> list[str]:
    return [o for o in outcomes if isinstance(o, str)]


def refusals(outcomes: list[Outcome]) -> set[grpc.StatusCode]:
    return {o for o in outcomes if isinstance(o, grpc.StatusCode)}


async def stop_all(stub: jobs_pb2_grpc.JobServiceStub) -> None:
    running = (await stub.List(pb.ListRequest(status=pb.JOB_STATUS_RUNNING))).jobs
    await asyncio.gather(*(stub.Stop(pb.StopRequest(id=j.id, grace_seconds=0), timeout=60) for j in running))


def audited(server: Server, method: str) -> int:
    """Calls of method the server has finished with (the audit line is written once the call's cleanup is done)."""
    lines = (server.state_dir / "audit.log").read_text().splitlines()
    return sum(1 for line in lines if json.loads(line)["method"] == method)


async def until_audited(server: Server, method: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + bound(timeout)
    while audited(server, method) < n:
        assert time.monotonic() < deadline, f"the server finished {audited(server, method)} of {n} {method} calls"
        await asyncio.sleep(0.05)


async def test_running_quotas_hold_exactly_under_concurrent_starts(quota_server: Server) -> None:
    srv = quota_server
    async with aio_stub(srv, "alice") as alice, aio_stub(srv, "bob") as bob:
        # one user: exactly the per-user quota out of many concurrent Starts
        outcomes = await start_many(alice, 60)
        assert len(started(outcomes)) == 12, f"{len(started(outcomes))} of 60 concurrent Starts ran (quota 12)"
        assert refusals(outcomes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        await stop_all(alice)

        # two users: exactly the server's total, neither user over their own
        a, b = await asyncio.gather(start_many(alice, 40), start_many(bob, 40))
        assert len(started(a)) + len(started(b)) == 20, (len(started(a)), len(started(b)))
        assert len(started(a)) <= 12 and len(started(b)) <= 12
        await asyncio.gather(stop_all(alice), stop_all(bob))

        # failures and cancelled calls give their reservation back
        failing = await start_many(alice, 30, pb.StartRequest(argv=[b"/nonexistent/command"]))
        assert not started(failing)
        assert refusals(failing) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
        pending = [asyncio.ensure_future(alice.Start(SLEEP, timeout=120)) for _ in range(30)]
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for call in pending:
            call.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await stop_all(alice)

        # the counts come back to zero: the full quota is there again, and never more than it
        deadline = time.monotonic() + bound(60)
        while True:
            outcomes = await start_many(alice, 40)
            await stop_all(alice)
            assert len(started(outcomes)) <= 12, f"{len(started(outcomes))} of 40 ran (quota 12)"
            if len(started(outcomes)) == 12:
                break
            # a cancelled call's cleanup may still hold its slot for a moment; a leaked slot never comes back
            assert time.monotonic() < deadline, f"only {len(started(outcomes))} of the 12 slots came back"
            await asyncio.sleep(0.1)


async def _open_streams(stub: jobs_pb2_grpc.JobServiceStub, job_id: str, n: int) -> tuple[list[object], int]:
    """n concurrent streams of job_id; (the streams that got output, how many were refused for the quota)."""
    calls = [stub.Stream(pb.StreamRequest(id=job_id)) for _ in range(n)]

    async def first(call: object) -> bool:
        try:
            await call.read()  # type: ignore[attr-defined]
            return True
        except aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            return False

    got = await asyncio.gather(*(first(c) for c in calls))
    return [c for c, ok in zip(calls, got, strict=True) if ok], got.count(False)


async def test_the_stream_quota_holds_exactly_under_concurrent_streams(quota_server: Server) -> None:
    srv = quota_server
    async with aio_stub(srv, "alice") as alice, aio_stub(srv, "bob") as bob:
        job = await alice.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo ready; exec sleep 1000"]))
        bob_job = await bob.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo ready; exec sleep 1000"]))
        streams = 0
        for _ in range(2):  # the second round proves every slot came back
            open_, refused = await _open_streams(alice, job.id, 30)
            assert (len(open_), refused) == (8, 22)
            bob_streams, bob_refused = await _open_streams(bob, bob_job.id, 1)  # others are still served
            assert (len(bob_streams), bob_refused) == (1, 0)
            for call in [*open_, *bob_streams]:
                call.cancel()  # type: ignore[attr-defined]
            streams += 31
            await until_audited(srv, "Stream", streams)  # the server has ended every cancelled stream
        await stop_all(alice)
        await stop_all(bob)


# A client that holds streams open and then vanishes without closing them (SIGSTOP: its kernel still holds the
# TCP connection open, but nothing answers the server any more).
HOLDER = """
import sys, grpc
from jobsvc._pb import jobs_pb2 as pb, jobs_pb2_grpc
target, ca, cert, key, job_id, n = sys.argv[1:7]
creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(), open(cert, "rb").read())
stub = jobs_pb2_grpc.JobServiceStub(grpc.secure_channel(target, creds))
streams = [stub.Stream(pb.StreamRequest(id=job_id)) for _ in range(int(n))]
for s in streams:
    next(s)
print("holding", flush=True)
sys.stdin.read()
"""


def test_a_vanished_clients_streams_are_released_by_keepalive(tmp_path: Path, keys: Pki) -> None:
    srv = start_server(
        tmp_path, keys, "--max-streams-per-user", "4", "--keepalive-time", "1s", "--keepalive-timeout", "1s"
    )
    holder = None
    try:
        stub = srv.stub()
        job = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo ready; exec sleep 1000"]))
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                HOLDER,
                srv.target,
                str(keys.ca),
                str(keys.cert("alice")),
                str(keys.key("alice")),
                job.id,
                "4",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"

        def new_stream() -> grpc.StatusCode:
            call = stub.Stream(pb.StreamRequest(id=job.id), timeout=10)
            try:
                next(call)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                return e.code()
            finally:
                call.cancel()

        assert new_stream() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the quota is held by the live client
        holder.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + bound(60)
        while (code := new_stream()) != grpc.StatusCode.OK:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, code
            assert time.monotonic() < deadline, "a stopped client still holds its streams"
            time.sleep(0.2)
        assert holder.poll() is None  # released by the server's keepalive, not by the client's end
        stub.Stop(pb.StopRequest(id=job.id, grace_seconds=0))
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        assert srv.stop() == 0, srv.log()
        shutil.rmtree(srv.work_root, ignore_errors=True)


def test_a_client_that_pings_too_often_is_sent_away(server: Server) -> None:
    keys = server.pki
    creds = grpc.ssl_channel_credentials(
        keys.ca.read_bytes(), keys.key("alice").read_bytes(), keys.cert("alice").read_bytes()
    )
    pinger = [  # a ping every 200 ms while no data flows, far more often than the server permits
        ("grpc.keepalive_time_ms", 200),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    stub = server.stub()
    job = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo ready; exec sleep 1000"]))
    with grpc.secure_channel(server.target, creds, options=pinger) as channel:
        call = jobs_pb2_grpc.JobServiceStub(channel).Stream(pb.StreamRequest(id=job.id), timeout=60)
        assert next(call).data == b"ready\n"
        with pytest.raises(grpc.RpcError) as err:
            next(call)  # the job prints nothing more: only the server closing the connection ends this
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "Too many pings" in (err.value.details() or ""), (
            err.value
        )
    assert stub.Get(pb.GetRequest(id=job.id)).status == pb.JOB_STATUS_RUNNING  # other clients are not affected
    stub.Stop(pb.StopRequest(id=job.id, grace_seconds=0))
