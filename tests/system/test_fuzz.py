"""Hostile input, property-based: random requests straight to the gRPC API of a real server.

Every call must get a proper status (never INTERNAL or UNKNOWN), and afterwards the server must be healthy with no
leaked process, cgroup or file descriptor.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobsvc._pb import jobs_pb2 as pb
from tests.system.conftest import processes_in_cgroup_named
from tests.system.server import Pki, Server, bound, start_server

BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SAFE_PROGRAMS = [b"true", b"false", b"echo", b"/no/such/program", b"", b"sleep"]

u64 = st.integers(min_value=0, max_value=2**64 - 1)
i_double = st.floats(allow_nan=True, allow_infinity=True)
ids = st.one_of(
    st.text(max_size=64),
    st.integers(min_value=1, max_value=100_000).map(lambda n: "9" * n),  # huge strings
    st.uuids().map(str),
)
arg = st.binary(max_size=64)
argv = st.one_of(
    st.lists(arg, max_size=6),
    st.tuples(st.sampled_from(SAFE_PROGRAMS), st.lists(arg, max_size=4)).map(lambda t: [t[0], *t[1]]),
    st.just([b"echo", b"x" * 200_000]),
)
io_limit = st.builds(
    pb.IoLimit,
    device=st.one_of(st.text(max_size=20), st.sampled_from(["/dev/null", "254:0", "0:0", "/dev/vda", "1:3"])),
    read_bps=u64,
    write_iops=u64,
)
limits = st.builds(
    pb.Limits,
    cpu=i_double,
    memory_bytes=u64,
    pids=u64,
    io=st.lists(io_limit, max_size=20),
) | st.just(pb.Limits())
requests = st.one_of(
    st.builds(lambda a, lim: ("Start", pb.StartRequest(argv=a, limits=lim)), argv, limits),
    st.builds(lambda i: ("Get", pb.GetRequest(id=i)), ids),
    st.builds(lambda i: ("Wait", pb.GetRequest(id=i)), ids),
    st.builds(lambda i, g: ("Stop", pb.StopRequest(id=i, grace_seconds=g)), ids, i_double),
    st.builds(lambda i, o: ("Stream", pb.StreamRequest(id=i, from_offset=o)), ids, u64),
    st.builds(lambda b: ("Raw", b), st.binary(max_size=256)),
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, keys: Pki) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("fuzz"), keys)
    yield srv
    assert srv.stop() == 0, srv.log()
    shutil.rmtree(srv.work_root, ignore_errors=True)


def call(server: Server, channel: grpc.Channel, name: str, request: object) -> None:
    stub_method = f"/jobsvc.v1.JobService/{name}"
    try:
        if name == "Raw":  # bytes that need not parse as any message
            # grpc-stubs makes the serializers required; grpc passes bytes through without them
            channel.unary_unary("/jobsvc.v1.JobService/Get")(request, timeout=10)  # type: ignore[call-arg]
        elif name == "Stream":
            fn = channel.unary_stream(
                stub_method,
                request_serializer=pb.StreamRequest.SerializeToString,
                response_deserializer=pb.StreamResponse.FromString,
            )
            for _ in fn(request, timeout=2):
                pass
        else:
            req_type = type(request)
            unary = channel.unary_unary(
                stub_method,
                request_serializer=req_type.SerializeToString,  # type: ignore[attr-defined]
                response_deserializer=pb.Job.FromString,
            )
            job = unary(request, timeout=2 if name == "Wait" else 20)
            if name == "Start":  # keep the host clean: nothing the fuzzer starts may run on
                server.stub().Stop(pb.StopRequest(id=job.id, grace_seconds=0), timeout=20)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and name in ("Wait", "Stream"):
            return  # a live job: waiting is the right answer
        assert e.code() not in BAD_CODES, (name, request, e.code(), e.details())


def test_random_requests_get_proper_statuses_and_leak_nothing(target: Server) -> None:
    channel = target.channel()
    target.stub().List(pb.ListRequest())  # warm up the server's own descriptors
    fds_before = target.fds()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(requests)
    def one(req: tuple[str, object]) -> None:
        call(target, channel, *req)

    one()
    # every job the fuzzer started has ended: nothing of them may remain
    jobs = target.stub().List(pb.ListRequest()).jobs
    deadline = time.monotonic() + bound(30)
    while any(j.status == pb.JOB_STATUS_RUNNING for j in jobs) and time.monotonic() < deadline:
        time.sleep(0.1)
        jobs = target.stub().List(pb.ListRequest()).jobs
    assert all(j.status != pb.JOB_STATUS_RUNNING for j in jobs)
    for j in jobs:
        assert processes_in_cgroup_named(j.id) == []
    instance = (target.state_dir / "instance").read_text().strip()
    groups = [p for p in _instance_groups(instance) if any(child.is_dir() for child in p.iterdir())]
    assert groups == [], "job groups left behind"
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="jobsvc.v1.JobService"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    time.sleep(0.5)
    leaked = target.fds() - fds_before
    assert not leaked, f"descriptors left open: {[os.path.basename(f) for f in leaked]}"


def _instance_groups(instance: str) -> list[Path]:
    found = []
    for root in Path("/sys/fs/cgroup").iterdir():
        for d in root.rglob(instance) if root.is_dir() and not root.is_symlink() else ():
            found.append(d)
    return found
