"""Every service on the port, not only JobService, over real sockets: health and reflection answer only verified,
allowed callers, and requests that do not parse are INVALID_ARGUMENT with no traceback."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobsvc import pki
from jobsvc._pb import jobs_pb2 as pb
from tests.system.server import Pki, Server, start_server

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
        return e.code()  # type: ignore[no-any-return]
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


def health_watch(channel: grpc.Channel) -> grpc.StatusCode:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
    try:
        assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    finally:
        call.cancel()


def list_services(channel: grpc.Channel) -> grpc.StatusCode:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
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
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


GARBAGE = [b"\x0a\xff", b"\xff\xff\xff\xff", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"]


def test_malformed_requests_to_any_service_are_invalid_argument_without_a_traceback(guarded: Server) -> None:
    before = guarded.log().count("\n")
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
    log = guarded.log()
    assert "Traceback" not in log
    assert log.count("\n") - before <= calls + 2, "more than one log line per malformed call"
