"""Isolation between users on one host, attacked from inside real jobs on real servers.

A transient uid comes back to a later job (here at once: a range of one uid), two servers share the host's uids,
and a job looks for other users' processes in /proc: none of it may reach another user's files or processes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobsvc._pb import jobs_pb2 as pb
from tests.system.server import Pki, Server, start_server

UID = 61900  # a range of one uid: every job of these servers runs as it, one after another


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


def run(server: Server, user: str, script: str) -> tuple[pb.Job, bytes, bytes]:
    """Run sh -c script as user's job to its end: (final record, stdout, stderr)."""
    stub = server.stub(user)
    job = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", script.encode()]), timeout=30)
    record = stub.Wait(pb.GetRequest(id=job.id), timeout=60)
    out, err = b"", b""
    for msg in stub.Stream(pb.StreamRequest(id=job.id), timeout=60):
        if msg.stream == pb.OUTPUT_STREAM_STDERR:
            err += msg.data
        else:
            out += msg.data
    return record, out, err


def test_a_recycled_uid_finds_nothing_its_previous_owner_left(tmp_path: Path, keys: Pki, servers: list[Server]) -> None:
    server = start_server(tmp_path, keys, "--job-uids", f"{UID}-{UID}")
    servers.append(server)
    tag = uuid.uuid4().hex
    places = [f"/tmp/{tag}", f"/var/tmp/{tag}", f"/dev/shm/{tag}", f"/run/lock/{tag}"]
    leave = " ".join(f"echo alice-secret > {p};" for p in places)
    alice, out, err = run(
        server, "alice", f"{leave} echo alice-secret > secret; ipcmk -M 4096 >/dev/null; ipcmk -Q >/dev/null; pwd"
    )
    assert alice.exit_code == 0, err
    workdir = out.decode().strip()
    bob, out, err = run(
        server,
        "bob",
        "for f in " + " ".join([*places, f"{workdir}/secret"]) + "; do cat $f 2>/dev/null && echo LEAK $f; done;"
        " ipcs -m -q | grep -c '^0x' || true",
    )
    assert bob.uid == alice.uid == UID  # the same uid, one job after the other
    assert b"LEAK" not in out and b"alice-secret" not in out, out
    assert out.strip().splitlines()[-1] == b"0", out  # no System V shared memory or queue of alice's left
    for p in places:  # and nothing reached the host's own directories
        assert not Path(p).exists()


def test_two_servers_never_hand_out_one_uid(tmp_path: Path, keys: Pki, servers: list[Server]) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = start_server(tmp_path / "one", keys)
    second = start_server(tmp_path / "two", keys)
    servers += [first, second]
    alice = [first.stub("alice").Start(pb.StartRequest(argv=[b"sleep", b"1000"])) for _ in range(5)]
    bob = [second.stub("bob").Start(pb.StartRequest(argv=[b"sleep", b"1000"])) for _ in range(5)]
    alice_uids, bob_uids = {j.uid for j in alice}, {j.uid for j in bob}
    assert len(alice_uids) == len(bob_uids) == 5
    assert not alice_uids & bob_uids, (alice_uids, bob_uids)
    # alice's job on one server can neither see nor signal bob's job on the other
    record, out, _ = run(first, "alice", f"kill -0 {bob[0].pid} && echo SIGNALLED; cat /proc/{bob[0].pid}/environ")
    assert b"SIGNALLED" not in out and record.exit_code != 0
    assert second.stub("bob").Get(pb.GetRequest(id=bob[0].id)).status == pb.JOB_STATUS_RUNNING


def test_a_job_sees_only_its_own_processes_in_proc(tmp_path: Path, keys: Pki, servers: list[Server]) -> None:
    server = start_server(tmp_path, keys)
    servers.append(server)
    secret = uuid.uuid4().hex
    bob = server.stub("bob").Start(pb.StartRequest(argv=[b"sh", b"-c", b"sleep 1000", secret.encode()]))
    assert server.stub("bob").Get(pb.GetRequest(id=bob.id)).status == pb.JOB_STATUS_RUNNING
    record, out, _ = run(
        server,
        "alice",
        f"if test -e /proc/{bob.pid}; then echo visible; else echo hidden; fi;"
        " sleep 100 & if test -e /proc/$!; then echo visible; else echo hidden; fi;"
        f" cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '; cat /proc/{bob.pid}/cgroup 2>/dev/null; true",
    )
    lines = out.splitlines()
    assert lines[:2] == [b"hidden", b"visible"], out  # bob's job is not there; alice's own processes are
    assert secret.encode() not in out and bob.id.encode() not in out, out  # nor its argv, nor its cgroup
    assert record.exit_code == 0
    assert server.stub("bob").Get(pb.GetRequest(id=bob.id)).status == pb.JOB_STATUS_RUNNING
