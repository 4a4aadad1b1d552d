"""Every service on the port, not only JobService, over real sockets: health and reflection answer only verified,
allowed callers, and requests that do not parse are INVALID_ARGUMENT with no traceback."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobsvc import pki
from jobsvc._pb import jobs_pb2 as pb
from jobsvc._pb import jobs_pb2_grpc
from tests.system.server import Pki, Server, bound, start_server

HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, keys: Pki) -> Iterator[Server]:
    """A server with a CRL that revokes `revoked`'s certificate and a deny list naming `denied`."""
    tmp = tmp_path_factory.mktemp("guarded")
    ca = pki.load(keys.dir, "ca")
    serials = []
    for name in ("revoked", "denied"):
        issued = pki.issue(ca, name)
        (keys.dir / f"{name}.pem").write_bytes(issued.cert_pem)
        (keys.dir / f"{name}-key.pem").write_bytes(issued.key_pem)
        if name == "revoked":
            serials.append(issued.cert.serial_number)
    crl = tmp / "crl.pem"
    crl.write_bytes(pki.make_crl(ca, serials))
    srv = start_server(tmp, keys, "--crl", str(crl), "--deny-subject", "CN=denied")
    yield srv
    assert srv.stop() == 0, srv.log()
    shutil.rmtree(srv.work_root, ignore_errors=True)


def channel_as(server: Server, stem: str) -> grpc.Channel:
    d = server.pki.dir
    creds = grpc.ssl_channel_credentials(
        server.pki.ca.read_bytes(), (d / f"{stem}-key.pem").read_bytes(), (d / f"{stem}.pem").read_bytes()
    )
    return grpc.secure_channel(server.target, creds)


def health_check(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    except grpc.RpcError as e:
        return e.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


def health_watch(channel: grpc.Channel) -> grpc.StatusCode:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    try:
        assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        call.cancel()


def list_services(channel: grpc.Channel) -> grpc.StatusCode:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    except grpc.RpcError as e:
        return e.code()
    names = {s.name for s in replies[0].list_services_response.service}
    assert "jobsvc.v1.JobService" in names
    return grpc.StatusCode.OK


PROBES = {"Health/Check": health_check, "Health/Watch": health_watch, "reflection": list_services}


@pytest.mark.parametrize("probe", PROBES)
@pytest.mark.parametrize(
    ("stem", "refused"),
    [
        ("revoked", {grpc.StatusCode.UNAUTHENTICATED}),
        ("denied", {grpc.StatusCode.PERMISSION_DENIED}),
        # the CA's own certificate verifies against itself, but is never a user
        ("ca", {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE}),
    ],
)
def test_every_service_refuses_revoked_denied_and_ca_certificates(
    guarded: Server, probe: str, stem: str, refused: set[grpc.StatusCode]
) -> None:
    with channel_as(guarded, "alice") as good:
        assert PROBES[probe](good) == grpc.StatusCode.OK  # the same probe works for an allowed user
    with channel_as(guarded, stem) as bad:
        assert PROBES[probe](bad) in refused


def raw_call(channel: grpc.Channel, method: str, data: bytes, streaming: bool = False) -> grpc.StatusCode:
    """Send bytes as the request, unparsed; the call's status."""
    ident = lambda b: b  # noqa: E731
    try:
        if method == REFLECTION:
            list(channel.stream_stream(method, ident, ident)(iter([data]), timeout=30))
        elif streaming:
            list(channel.unary_stream(method, ident, ident)(data, timeout=30))
        else:
            channel.unary_unary(method, ident, ident)(data, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


GARBAGE = [b"\x0a\xff", b"\xff\xff\xff\xff", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"]


def test_malformed_requests_to_any_service_are_invalid_argument_without_a_traceback(guarded: Server) -> None:
    before = len(guarded.log())
    calls = 0
    with channel_as(guarded, "alice") as channel:
        for data in GARBAGE:
            for method, streaming in [
                (HEALTH + "Check", False),
                (HEALTH + "Watch", True),
                (REFLECTION, True),
                ("/jobsvc.v1.JobService/Get", False),
            ]:
                assert raw_call(channel, method, data, streaming) == grpc.StatusCode.INVALID_ARGUMENT, (method, data)
                calls += 1
        assert health_check(channel) == grpc.StatusCode.OK  # and the server goes on serving
        assert (
            raw_call(channel, "/jobsvc.v1.JobService/List", pb.ListRequest().SerializeToString()) == grpc.StatusCode.OK
        )
    log = guarded.log()[before:]
    assert "Traceback" not in log
    # the lines about these calls (other lines, such as an earlier test's job ending, may come meanwhile)
    about = [x for x in log.splitlines() if "INVALID_ARGUMENT" in x or " WARNING " in x or " ERROR " in x]
    assert len(about) <= calls, f"more than one log line per malformed call: {len(about)} for {calls}"


# -- load before authentication and per user ----------------------------------------------------------------------

FD_LIMIT = 512  # the server's hard open-file limit in the flood test, so that a flood can reach it


def test_silent_connections_do_not_stop_a_real_clients_calls(tmp_path: Path, keys: Pki) -> None:
    # 600 TCP connections that never speak TLS, against a server that may hold 512 descriptors: before the bound,
    # they took every descriptor for grpc's 120 s handshake timeout, and no client could connect or start a job.
    srv = start_server(tmp_path, keys, prefix=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"))
    silent: list[socket.socket] = []
    try:
        established = srv.stub()  # a client connected before the flood
        for _ in range(600):
            silent.append(socket.create_connection(("127.0.0.1", srv.port), timeout=30))
        assert established.List(pb.ListRequest(), timeout=30) is not None
        job = established.Start(pb.StartRequest(argv=[b"true"]), timeout=30)  # descriptors are left for jobs
        assert established.Wait(pb.GetRequest(id=job.id), timeout=60).exit_code == 0
        # a client that connects during the flood (the flood's sockets stay open on this side) is served
        with channel_as(srv, "bob") as fresh:
            stub = jobs_pb2_grpc.JobServiceStub(fresh)
            job = stub.Start(pb.StartRequest(argv=[b"true"]), timeout=60, wait_for_ready=True)
            assert stub.Wait(pb.GetRequest(id=job.id), timeout=60).exit_code == 0
    finally:
        for s in silent:
            s.close()
        assert srv.stop() == 0, srv.log()
        shutil.rmtree(srv.work_root, ignore_errors=True)


def test_calls_per_connection_are_capped(tmp_path: Path, keys: Pki) -> None:
    srv = start_server(tmp_path, keys, "--max-calls-per-connection", "4")
    try:
        other = srv.stub("alice")
        job = other.Start(pb.StartRequest(argv=[b"sleep", b"1000"]))
        with channel_as(srv, "alice") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            waits = [stub.Wait.future(pb.GetRequest(id=job.id), timeout=120) for _ in range(4)]
            # the four Waits hold every call this connection may have: a fifth call cannot get in ...
            with pytest.raises(grpc.RpcError) as err:
                stub.Get(pb.GetRequest(id=job.id), timeout=3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert not any(w.done() for w in waits)
            # ... while other connections are served, and the fifth gets in once a call ends
            assert other.Get(pb.GetRequest(id=job.id)).status == pb.JOB_STATUS_RUNNING
            queued = stub.Get.future(pb.GetRequest(id=job.id), timeout=60)
            other.Stop(pb.StopRequest(id=job.id, grace_seconds=0))
            assert {w.result().status for w in waits} == {pb.JOB_STATUS_STOPPED}
            assert queued.result().status == pb.JOB_STATUS_STOPPED
    finally:
        assert srv.stop() == 0, srv.log()
        shutil.rmtree(srv.work_root, ignore_errors=True)


HELD = 10


async def _hold_waits(
    server: Server, opened: list[aio.Channel], job_id: str, n: int
) -> tuple[list[asyncio.Future[Any]], int]:
    """n concurrent Waits of job_id over the connections opened; (the Waits still held, how many were refused)."""
    channels = len(opened)
    stubs = [jobs_pb2_grpc.JobServiceStub(c) for c in opened]
    for c in opened:
        await asyncio.wait_for(c.channel_ready(), 30)
    calls = [asyncio.ensure_future(stubs[i % channels].Wait(pb.GetRequest(id=job_id), timeout=120)) for i in range(n)]
    refused = 0
    deadline = time.monotonic() + bound(60)
    while True:  # the refusals come back at once; the held Waits only when the job ends
        done = [c for c in calls if c.done()]
        for c in done:
            e = c.exception()
            assert isinstance(e, aio.AioRpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            assert f"at most {HELD} concurrent Wait and streaming calls per user" in (e.details() or "")
        refused = len(done)
        if refused >= n - HELD:
            break
        assert time.monotonic() < deadline, f"{refused} of {n} Waits refused, quota {HELD}"
        await asyncio.sleep(0.05)
    return [c for c in calls if not c.done()], refused


def creds(server: Server, user: str) -> grpc.ChannelCredentials:
    k = server.pki
    return grpc.ssl_channel_credentials(k.ca.read_bytes(), k.key(user).read_bytes(), k.cert(user).read_bytes())


async def test_the_per_user_call_quota_holds_exactly_under_concurrency(tmp_path: Path, keys: Pki) -> None:
    srv = start_server(tmp_path, keys, "--max-calls-per-user", str(HELD))
    try:
        alice, bob = srv.stub("alice"), srv.stub("bob")
        bob_job = bob.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo ready; exec sleep 1000"]))
        opened = [aio.secure_channel(srv.target, creds(srv, "alice")) for _ in range(4)]
        for _ in range(2):  # the second round proves every slot came back
            job = alice.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo ready; exec sleep 1000"]))
            held, refused = await _hold_waits(srv, opened, job.id, 40)
            assert (len(held), refused) == (HELD, 40 - HELD)
            # a Stream counts toward the same quota; short calls do not, and other users are still served
            with pytest.raises(grpc.RpcError) as err:
                next(alice.Stream(pb.StreamRequest(id=job.id), timeout=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert alice.Get(pb.GetRequest(id=job.id)).status == pb.JOB_STATUS_RUNNING
            assert next(bob.Stream(pb.StreamRequest(id=bob_job.id), timeout=30)).data == b"ready\n"
            alice.Stop(pb.StopRequest(id=job.id, grace_seconds=0))
            ended = await asyncio.gather(*held)
            assert {r.status for r in ended} == {pb.JOB_STATUS_STOPPED}
        bob.Stop(pb.StopRequest(id=bob_job.id, grace_seconds=0))
        for c in opened:
            await c.close(None)
    finally:
        assert srv.stop() == 0, srv.log()
        shutil.rmtree(srv.work_root, ignore_errors=True)
