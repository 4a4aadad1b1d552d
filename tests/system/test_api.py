"""The gRPC API on a real server process: real certificates, real sockets, real jobs."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import socket
import ssl
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jobsvc._pb import jobs_pb2 as pb
from jobsvc._pb import jobs_pb2_grpc
from tests.system.conftest import processes_in_cgroup_named
from tests.system.server import Server, make_pki, start_server


def stream_bytes(server: Server, job_id: str, user: str = "alice", from_offset: int = 0) -> dict[int, bytes]:
    parts: dict[int, list[bytes]] = {pb.OUTPUT_STREAM_STDOUT: [], pb.OUTPUT_STREAM_STDERR: []}
    expected_offset = from_offset
    for msg in server.stub(user).Stream(pb.StreamRequest(id=job_id, from_offset=from_offset)):
        assert msg.offset == expected_offset
        expected_offset += len(msg.data)
        parts[msg.stream].append(msg.data)
    return {k: b"".join(v) for k, v in parts.items()}


def rpc_error(fn: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args)  # type: ignore[operator]
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            list(result)  # a stream fails on first read
    return info.value


def test_every_rpc_round_trips(server: Server) -> None:
    stub = server.stub()
    job = stub.Start(
        pb.StartRequest(
            argv=[b"sh", b"-c", b"echo out; echo err >&2; sleep 0.2; exit 3"],
            limits=pb.Limits(memory_bytes=256 << 20, pids=64),
        )
    )
    assert job.owner == "CN=alice"
    assert job.status == pb.JOB_STATUS_RUNNING
    assert list(job.command) == [b"sh", b"-c", b"echo out; echo err >&2; sleep 0.2; exit 3"]
    assert job.limits.memory_bytes == 256 << 20 and job.limits.pids == 64 and not job.limits.HasField("cpu")
    assert stub.Get(pb.GetRequest(id=job.id)).id == job.id
    assert job.id in [j.id for j in stub.List(pb.ListRequest()).jobs]
    out = stream_bytes(server, job.id)
    assert out == {pb.OUTPUT_STREAM_STDOUT: b"out\n", pb.OUTPUT_STREAM_STDERR: b"err\n"}
    done = stub.Wait(pb.GetRequest(id=job.id))
    assert done.status == pb.JOB_STATUS_FINISHED and done.exit_code == 3 and not done.HasField("signal")
    assert done.HasField("ended_at") and done.output_bytes == 8
    assert done.usage.cpu_seconds > 0
    sleeper = stub.Start(pb.StartRequest(argv=[b"sleep", b"1000"]))
    stopped = stub.Stop(pb.StopRequest(id=sleeper.id, grace_seconds=1))
    assert stopped.status == pb.JOB_STATUS_STOPPED and stopped.signal == 15 and stopped.reason == "stopped by owner"
    assert processes_in_cgroup_named(sleeper.id) == []


def test_twenty_concurrent_streams_are_byte_identical(server: Server, tmp_path: Path) -> None:
    job = server.stub().Start(pb.StartRequest(argv=[b"sh", b"-c", b"head -c 16M /dev/urandom | tee copy"]))
    copy = server.work_root / job.id / "copy"  # the job's own working directory
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: stream_bytes(server, job.id), range(20)))
    expected = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert copy.stat().st_size == 16 << 20
    for r in results:
        assert hashlib.sha256(r[pb.OUTPUT_STREAM_STDOUT]).hexdigest() == expected


def test_stream_from_offset_resumes_exactly(server: Server) -> None:
    script = b"for i in $(seq 1 2000); do echo line$i; done; echo tail >&2"
    job = server.stub().Start(pb.StartRequest(argv=[b"sh", b"-c", script]))
    full = stream_bytes(server, job.id)
    everything = full[pb.OUTPUT_STREAM_STDOUT] + full[pb.OUTPUT_STREAM_STDERR]
    for offset in (0, 1, 5000, len(everything) - 5, len(everything)):
        part = stream_bytes(server, job.id, from_offset=offset)
        assert part[pb.OUTPUT_STREAM_STDOUT] + part[pb.OUTPUT_STREAM_STDERR] == everything[offset:]


def test_a_user_cannot_see_or_touch_another_users_job(server: Server) -> None:
    bob_job = server.stub("bob").Start(pb.StartRequest(argv=[b"sleep", b"1000"]))
    alice = server.stub("alice")
    missing = "00000000-0000-4000-8000-000000000000"
    for call, theirs, absent in [
        (alice.Get, pb.GetRequest(id=bob_job.id), pb.GetRequest(id=missing)),
        (alice.Wait, pb.GetRequest(id=bob_job.id), pb.GetRequest(id=missing)),
        (alice.Stop, pb.StopRequest(id=bob_job.id), pb.StopRequest(id=missing)),
        (alice.Stream, pb.StreamRequest(id=bob_job.id), pb.StreamRequest(id=missing)),
        (alice.Get, pb.GetRequest(id=bob_job.id[:8]), pb.GetRequest(id=missing[:8])),
    ]:
        e1, e2 = rpc_error(call, theirs), rpc_error(call, absent)
        assert e1.code() == e2.code() == grpc.StatusCode.NOT_FOUND
        assert e1.details() == e2.details()
    assert bob_job.id not in [j.id for j in alice.List(pb.ListRequest()).jobs]
    still = server.stub("bob").Get(pb.GetRequest(id=bob_job.id))
    assert still.status == pb.JOB_STATUS_RUNNING
    server.stub("bob").Stop(pb.StopRequest(id=bob_job.id, grace_seconds=0))


def test_same_common_name_different_organization_are_two_users(server: Server) -> None:
    acme, globex = server.stub("alice-acme"), server.stub("alice-globex")
    job = acme.Start(pb.StartRequest(argv=[b"true"]))
    assert job.owner == "CN=alice,O=Acme"
    assert rpc_error(globex.Get, pb.GetRequest(id=job.id)).code() == grpc.StatusCode.NOT_FOUND
    assert job.id not in [j.id for j in globex.List(pb.ListRequest()).jobs]
    assert job.id not in [j.id for j in server.stub("alice").List(pb.ListRequest()).jobs]


@pytest.mark.parametrize("who", ["no certificate", "another CA with the same name", "expired"])
def test_bad_client_certificates_are_refused_at_the_handshake(server: Server, who: str) -> None:
    ca = server.pki.ca.read_bytes()
    if who == "no certificate":
        creds = grpc.ssl_channel_credentials(ca)
    else:
        user = {"another CA with the same name": "mallory", "expired": "expired"}[who]
        creds = grpc.ssl_channel_credentials(ca, server.pki.key(user).read_bytes(), server.pki.cert(user).read_bytes())
    from jobsvc._pb import jobs_pb2_grpc

    stub = jobs_pb2_grpc.JobServiceStub(grpc.secure_channel(server.target, creds))
    err = rpc_error(stub.List, pb.ListRequest())
    assert err.code() == grpc.StatusCode.UNAVAILABLE  # no call reached a handler
    # the server keeps serving good clients
    assert server.stub("alice").List(pb.ListRequest()) is not None
    assert server.proc.poll() is None


def _handshake(port: int, version: ssl.TLSVersion, keys: object) -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # OpenSSL will not offer TLS 1.0/1.1 at its default level
    ctx.load_verify_locations(str(keys.ca))  # type: ignore[attr-defined]
    ctx.load_cert_chain(str(keys.cert("alice")), str(keys.key("alice")))  # type: ignore[attr-defined]
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost"):
                return True
        except (ssl.SSLError, ConnectionResetError):
            return False


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_below_1_2_is_refused_with_a_positive_control(server: Server) -> None:
    assert _handshake(server.port, ssl.TLSVersion.TLSv1_2, server.pki)  # the same client works with 1.2
    assert _handshake(server.port, ssl.TLSVersion.TLSv1_3, server.pki)
    assert not _handshake(server.port, ssl.TLSVersion.TLSv1_1, server.pki)
    assert not _handshake(server.port, ssl.TLSVersion.TLSv1, server.pki)


def test_oversized_and_non_utf8_argv(server: Server) -> None:
    stub = server.stub()
    err = rpc_error(stub.Start, pb.StartRequest(argv=[b"echo", b"x" * (200 * 1024)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 131072" in (err.details() or "")
    for argv in ([], [b""], [b"echo", b"a\x00b"]):
        assert rpc_error(stub.Start, pb.StartRequest(argv=argv)).code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(stub.Start, pb.StartRequest(argv=[b"/no/such/binary"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "No such file or directory" in (err.details() or "")
    job = stub.Start(pb.StartRequest(argv=[b"printf", b"%s", b"\xff\xfe caf\xc3\xa9 \x80"]))
    assert list(job.command)[2] == b"\xff\xfe caf\xc3\xa9 \x80"
    assert stream_bytes(server, job.id)[pb.OUTPUT_STREAM_STDOUT] == b"\xff\xfe caf\xc3\xa9 \x80"


def test_bad_requests_get_clear_statuses(server: Server) -> None:
    stub = server.stub()
    cases = [
        (stub.Start, pb.StartRequest(argv=[b"true"], limits=pb.Limits(cpu=-1)), "cpu"),
        (stub.Start, pb.StartRequest(argv=[b"true"], limits=pb.Limits(memory_bytes=1)), "memory"),
        (stub.Start, pb.StartRequest(argv=[b"true"], limits=pb.Limits(pids=0)), "pids"),
        (stub.Stop, pb.StopRequest(id="whatever", grace_seconds=-1), "grace"),
        (stub.Get, pb.GetRequest(id=""), "no such job"),
    ]
    for call, request, word in cases:
        err = rpc_error(call, request)
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), request
        assert word in (err.details() or "")


def test_health_and_reflection(server: Server) -> None:
    channel = server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jobsvc.v1.JobService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "jobsvc.v1.JobService" in names and "grpc.health.v1.Health" in names


def test_no_fd_leak_after_a_thousand_calls(server: Server) -> None:
    stub = server.stub()
    job = stub.Start(pb.StartRequest(argv=[b"echo", b"hi"]))
    stub.Wait(pb.GetRequest(id=job.id))
    for _ in range(20):  # warm up: grpc opens its own descriptors lazily
        stub.Get(pb.GetRequest(id=job.id))
    before = server.fds()
    for i in range(1000):
        if i % 4 == 0:
            list(stub.Stream(pb.StreamRequest(id=job.id)))
        elif i % 4 == 1:
            rpc_error(stub.Get, pb.GetRequest(id="missing"))
        else:
            stub.Get(pb.GetRequest(id=job.id))
    time.sleep(0.2)
    leaked = server.fds() - before
    assert not leaked, f"descriptors left open: {sorted(leaked)}"


def test_one_structured_log_line_per_request(server: Server) -> None:
    stub = server.stub("bob")
    job = stub.Start(pb.StartRequest(argv=[b"true"]))
    stub.Get(pb.GetRequest(id=job.id))
    time.sleep(0.1)
    entries = [
        json.loads(line.split("jobsvc.request ", 1)[1])
        for line in server.log().splitlines()
        if "jobsvc.request " in line
    ]
    mine = [e for e in entries if e["job_id"] == job.id]
    assert [e["method"] for e in mine] == ["Start", "Get"]
    for e in mine:
        assert e["identity"] == "CN=bob" and e["outcome"] == "OK" and e["duration_ms"] >= 0


def test_sigterm_stops_running_jobs_and_exits_zero(tmp_path: Path) -> None:
    keys = make_pki(tmp_path / "pki")
    srv = start_server(tmp_path, keys)
    job = srv.stub().Start(pb.StartRequest(argv=[b"sh", b"-c", b"sleep 1000 & sleep 1000 & wait"]))
    time.sleep(0.2)
    assert processes_in_cgroup_named(job.id)
    assert srv.stop() == 0
    assert processes_in_cgroup_named(job.id) == []
    record = json.loads((srv.state_dir / "jobs" / job.id / "record.json").read_text())
    assert record["status"] == "stopped" and record["reason"] == "server shutting down"


def test_port_in_use_is_a_clear_startup_error(server: Server, tmp_path: Path) -> None:
    import subprocess

    from tests.system.server import serve_command

    proc = subprocess.run(
        serve_command(server.pki, server.target, tmp_path / "s", tmp_path / "work"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot listen on" in proc.stderr and "Traceback" not in proc.stderr
    # nor does it leave the (empty) parent groups it made for its jobs, in any hierarchy
    from jobsvc.cgroups.base import locate

    instance = (tmp_path / "s" / "instance").read_text().strip()
    left = [d for d in locate(instance, Path("/proc/self")) if d.exists()]
    assert not left, left


def test_clients_dropping_open_streams_do_not_crash_the_server(server: Server) -> None:
    # Regression: the request log read context.peer() after grpc had freed a cancelled call, a null dereference
    # in cygrpc that killed the whole server now and then.
    job = server.stub().Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo live; sleep 1000"]))
    stub = server.stub()
    for i in range(40):
        stream = stub.Stream(pb.StreamRequest(id=job.id))
        assert next(stream).data == b"live\n"
        stream.cancel()  # the client gives up on the open stream (RST_STREAM; the connection stays)
        if i % 10 == 0:
            channel = server.channel()
            assert next(jobs_pb2_grpc.JobServiceStub(channel).Stream(pb.StreamRequest(id=job.id))).data
            channel.close()  # or goes away altogether with it open
    time.sleep(0.3)
    assert server.proc.poll() is None
    assert server.stub().Get(pb.GetRequest(id=job.id)).status == pb.JOB_STATUS_RUNNING
    server.stub().Stop(pb.StopRequest(id=job.id, grace_seconds=0))


def test_the_server_logs_which_cgroup_driver_it_uses(server: Server) -> None:
    from tests.system.conftest import CGROUP_VERSION

    instance = (server.state_dir / "instance").read_text().strip()
    line = next(x for x in server.log().splitlines() if "job groups beneath" in x)
    assert f"cgroup {CGROUP_VERSION}: job groups beneath " in line and f"/jobsvc/{instance}" in line, line


def test_list_works_at_any_size_in_pages(tmp_path: Path) -> None:
    # 250 jobs with 20 KB commands are 5 MB of records: one reply of them all is over grpc's 4 MiB limit
    import subprocess

    from tests.system.server import BIN

    srv = start_server(tmp_path, make_pki(tmp_path / "pki"))
    try:
        stub = srv.stub()
        started = []
        for i in range(250):
            job = stub.Start(pb.StartRequest(argv=[b"true", str(i).encode() + b"-" + b"x" * 20_000]))
            started.append(job.id)
        first = stub.List(pb.ListRequest())
        assert 0 < len(first.jobs) < 250 and first.next_page_token  # a page, about 1 MiB at most
        assert first.ByteSize() <= 1_100_000
        ids: list[str] = []
        req = pb.ListRequest(page_size=40)
        while True:
            reply = stub.List(req)
            ids += [j.id for j in reply.jobs]
            if not reply.next_page_token:
                break
            req.page_token = reply.next_page_token
        assert ids == started  # every job once, oldest first
        newest = stub.List(pb.ListRequest(page_size=3, newest_first=True))
        assert [j.id for j in newest.jobs] == started[-3:][::-1]
        with pytest.raises(grpc.RpcError) as bad:
            stub.List(pb.ListRequest(page_token="not-a-token"))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        def jobctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([BIN / "jobctl", *args], env=srv.env(), capture_output=True, text=True, timeout=120)

        every = jobctl("list", "--json")
        assert every.returncode == 0, every.stderr
        assert [r["id"] for r in json.loads(every.stdout)] == started
        last = jobctl("list", "--limit", "2", "--json")
        assert [r["id"] for r in json.loads(last.stdout)] == started[-2:]  # the newest two, oldest first
    finally:
        srv.stop()
