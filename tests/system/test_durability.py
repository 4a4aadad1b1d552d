"""Fault injection: kill -9, restarts, stray groups, a full disk, a corrupt state dir, SIGTERM with open streams."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from jobsvc._pb import jobs_pb2 as pb
from jobsvc.cgroups.base import locate
from jobsvc.store import read_journal
from tests.system.conftest import processes_in_cgroup_named
from tests.system.server import BIN, Pki, Server, bound, serve_command, start_server

PY = "/usr/bin/python3"


def stream_all(server: Server, job_id: str, from_offset: int = 0) -> tuple[bytes, list[int]]:
    data, offsets = [], []
    for msg in server.stub().Stream(pb.StreamRequest(id=job_id, from_offset=from_offset), timeout=60):
        data.append(msg.data)
        offsets.append(msg.offset)
    return b"".join(data), offsets


def kill9(server: Server) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    server.stopped = True


def restart(server: Server, *args: str) -> Server:
    """A new server process on the same state dir (a new port and work root)."""
    return start_server(server.state_dir.parent, server.pki, *args)


@pytest.fixture
def cleanup() -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for s in servers:
        if not s.stopped:
            s.stop()
        shutil.rmtree(s.work_root, ignore_errors=True)


def test_restart_after_kill9_keeps_every_job_and_its_output(tmp_path: Path, keys: Pki, cleanup: list[Server]) -> None:
    first = start_server(tmp_path, keys)
    cleanup.append(first)
    stub = first.stub()
    done = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo finished-job; exit 3"]))
    stub.Wait(pb.GetRequest(id=done.id))
    live = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo started; sleep 1000 & sleep 1000"]))
    before_live = next(iter(stub.Stream(pb.StreamRequest(id=live.id)))).data
    before_done, _ = stream_all(first, done.id)
    kill9(first)
    orphans = processes_in_cgroup_named(live.id)
    assert orphans, "the jobs outlive a crashed server until it comes back"

    second = restart(first)
    cleanup.append(second)
    stub2 = second.stub()
    jobs = {j.id: j for j in stub2.List(pb.ListRequest()).jobs}
    assert set(jobs) == {done.id, live.id}
    assert jobs[done.id].status == pb.JOB_STATUS_FINISHED and jobs[done.id].exit_code == 3
    assert jobs[live.id].status == pb.JOB_STATUS_STOPPED and jobs[live.id].reason == "server restarted"
    assert processes_in_cgroup_named(live.id) == []
    for pid in orphans:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert stream_all(second, done.id)[0] == before_done == b"finished-job\n"
    assert stream_all(second, live.id)[0] == before_live == b"started\n"


def test_a_job_that_writes_while_the_server_is_down_ends_with_sigpipe(
    tmp_path: Path, keys: Pki, cleanup: list[Server]
) -> None:
    # What the README promises of a crash: the output read before it is kept; a job writing while the server is
    # down finds no reader on its pipe (SIGPIPE); a quiet job lives on until the restart ends it.
    first = start_server(tmp_path, keys)
    cleanup.append(first)
    stub = first.stub()
    writer = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", b"while true; do echo tick; sleep 0.05; done"]))
    quiet = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo once; exec sleep 1000"]))
    for job in (writer, quiet):
        next(iter(stub.Stream(pb.StreamRequest(id=job.id))))
    kill9(first)
    deadline = time.monotonic() + bound(30)
    while processes_in_cgroup_named(writer.id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_in_cgroup_named(writer.id) == [], "the writer outlived the reader of its pipe"
    assert processes_in_cgroup_named(quiet.id), "a job that does not write lives on until the restart"
    second = restart(first)
    cleanup.append(second)
    jobs = {j.id: j for j in second.stub().List(pb.ListRequest()).jobs}
    assert {jobs[writer.id].reason, jobs[quiet.id].reason} == {"server restarted"}
    assert processes_in_cgroup_named(quiet.id) == []
    assert stream_all(second, writer.id)[0].startswith(b"tick\n")  # what was read before the crash is kept


def test_restart_removes_stray_groups_of_its_instance_only(tmp_path: Path, keys: Pki, cleanup: list[Server]) -> None:
    first = start_server(tmp_path, keys)
    cleanup.append(first)
    instance = (first.state_dir / "instance").read_text().strip()
    kill9(first)
    # the server was started in our group (v1), or shares our supervisor leaf (v2): its groups are where ours are
    base = locate(instance, Path("/proc/self"))[-1]
    stray = base / "stray-job"
    foreign = base.parent / "0123456789ab" / "their-job"
    procs = []
    try:
        for group in (stray, foreign):
            group.mkdir(parents=True)
            p = subprocess.Popen(["sleep", "1000"])
            procs.append(p)
            (group / "cgroup.procs").write_text(str(p.pid))
        second = restart(first)
        cleanup.append(second)
        assert procs[0].wait(10) == -signal.SIGKILL  # the stray process of this instance was killed
        assert not stray.exists()
        assert procs[1].poll() is None and foreign.exists()  # another instance's group is not ours to touch
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for group in (foreign, foreign.parent):
            for _ in range(100):
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def test_kill9_at_a_random_moment_loses_nothing_acknowledged(tmp_path: Path, keys: Pki, cleanup: list[Server]) -> None:
    server = start_server(tmp_path, keys)
    cleanup.append(server)
    acked: dict[str, bytes] = {}  # job id -> bytes delivered to us before the crash
    stopped: set[str] = set()
    progress = threading.Event()  # set once a job's output has been delivered to us
    script = b"for i in $(seq 1 200); do echo line-$i; sleep 0.005; done"

    def workload() -> None:
        stub = server.stub()
        try:
            for i in range(1000):
                job = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", script]), timeout=10)
                acked[job.id] = b""
                got = b""
                for msg in stub.Stream(pb.StreamRequest(id=job.id), timeout=10):
                    got += msg.data
                    acked[job.id] = got
                    progress.set()
                    if i % 3 == 0 and len(got) > 100:
                        stub.Stop(pb.StopRequest(id=job.id, grace_seconds=0), timeout=10)
                        stopped.add(job.id)
                        break
        except grpc.RpcError:
            return  # the server died under us

    worker = threading.Thread(target=workload)
    worker.start()
    # The crash comes at a random moment after the workload got going: on a slow host (an emulated guest
    # sharing two busy cores) a fixed delay could end before the first Start was answered.
    assert progress.wait(120), "the workload got nothing done in 120 s"
    time.sleep(random.uniform(0.0, 1.5))
    kill9(server)
    worker.join(30)
    assert acked, "the workload got nothing done before the crash"
    again = restart(server)
    cleanup.append(again)
    listed = {j.id: j for j in again.stub().List(pb.ListRequest()).jobs}
    for job_id, delivered in acked.items():
        assert job_id in listed, "an acknowledged job is missing after the crash"
        record = listed[job_id]
        assert record.status in (pb.JOB_STATUS_FINISHED, pb.JOB_STATUS_STOPPED)
        if job_id in stopped:
            assert record.status == pb.JOB_STATUS_STOPPED
        now, _ = stream_all(again, job_id)
        assert now.startswith(delivered), "output delivered before the crash differs after it"
        assert processes_in_cgroup_named(job_id) == []


def test_output_cap_rotates_and_jobctl_says_what_was_dropped(tmp_path: Path, keys: Pki, cleanup: list[Server]) -> None:
    server = start_server(tmp_path, keys, "--max-output", "1M")
    cleanup.append(server)
    writer = (
        "import sys, time\n"
        "for i in range(256):\n"
        "    sys.stdout.write(''.join(f'{i:05d}-{j:05d}\\n' for j in range(8192 // 12)) + '\\n' * (8192 % 12))\n"
        "    sys.stdout.flush()\n"
        "    time.sleep(0.01)\n"
    )
    expected = subprocess.run([PY, "-c", writer], capture_output=True, check=True).stdout
    assert len(expected) == 2 << 20
    job = server.stub().Start(pb.StartRequest(argv=[PY.encode(), b"-c", writer.encode()]))
    live, offsets = stream_all(server, job.id)  # a reader that keeps up from the first byte
    assert live == expected
    assert offsets[0] == 0 and all(a < b for a, b in itertools.pairwise(offsets))
    record = server.stub().Wait(pb.GetRequest(id=job.id))
    dropped = record.output_dropped_bytes
    assert dropped >= 1 << 20 and record.output_bytes - dropped <= 1 << 20
    late, late_offsets = stream_all(server, job.id)
    assert late_offsets[0] == dropped and late == expected[dropped:]
    proc = subprocess.run([BIN / "jobctl", "stream", "--id", job.id], env=server.env(), capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == expected[dropped:]
    assert proc.stderr.decode() == f"jobctl: first {dropped} bytes dropped by the server's output retention\n"
    segments = list((server.state_dir / "jobs" / job.id / "output").glob("*.seg"))
    assert sum(p.stat().st_size for p in segments) <= 1 << 20


@contextlib.contextmanager
def loop_fs(image: Path, mount: Path) -> Iterator[Path]:
    """A 48 MiB ext4 filesystem on a loop device, without root's reserved blocks, mounted at mount."""
    with open(image, "wb") as f:
        f.truncate(48 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", "-F", str(image)], check=True)
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with loop_fs(tmp_path / "fs.img", tmp_path / "mnt") as mount:
        yield mount


@pytest.fixture
def small_state_dir(tmp_path: Path) -> Iterator[Path]:
    """A server directory whose state dir (only) is a small filesystem: the server's log stays writable."""
    with loop_fs(tmp_path / "fs.img", tmp_path / "server" / "state"):
        yield tmp_path / "server"


def test_a_full_disk_loses_output_but_never_blocks_jobs(small_fs: Path, keys: Pki, cleanup: list[Server]) -> None:
    server = start_server(small_fs, keys, "--max-output-per-user", "1G")  # the disk, not a user's share, is full
    cleanup.append(server)
    filler = small_fs / "filler"
    free = shutil.disk_usage(small_fs).free
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * (free - (12 << 20)))  # leave 12 MiB: Start still works, the job's output will not fit
    stub = server.stub()
    job = stub.Start(pb.StartRequest(argv=[b"head", b"-c", b"40M", b"/dev/zero"]))
    record = stub.Wait(pb.GetRequest(id=job.id), timeout=120)
    assert record.status == pb.JOB_STATUS_FINISHED and record.exit_code == 0  # never blocked
    assert record.output_lost_bytes > 0
    assert record.output_bytes == 40 << 20  # offsets count every byte the job wrote, stored or lost
    # a reader sees where the output was lost: the offsets jump over it, and the bytes around it are exact
    chunks = [(m.offset, m.data) for m in stub.Stream(pb.StreamRequest(id=job.id), timeout=60)]
    stored = sum(len(d) for _, d in chunks)
    assert stored == record.output_bytes - record.output_lost_bytes and not any(any(d) for _, d in chunks)
    gaps = [b[0] - (a[0] + len(a[1])) for a, b in itertools.pairwise(chunks) if b[0] != a[0] + len(a[1])]
    tail = record.output_bytes - (chunks[-1][0] + len(chunks[-1][1])) if chunks else record.output_bytes
    assert sum(gaps) + tail == record.output_lost_bytes  # lost in the middle (a jump) or at the end
    with pytest.raises(grpc.RpcError) as err:
        stub.Start(pb.StartRequest(argv=[b"true"]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in (err.value.details() or "")
    filler.unlink()  # space returns: the server recovers by itself
    again = stub.Start(pb.StartRequest(argv=[b"echo", b"back"]))
    assert stream_all(server, again.id)[0] == b"back\n"
    time.sleep(3)  # the janitor saves whatever record the full disk refused
    saved = json.loads((server.state_dir / "jobs" / job.id / "record.json").read_text())
    assert saved["status"] == "finished" and saved["output_lost_bytes"] == record.output_lost_bytes


def test_output_lost_on_a_full_disk_is_a_gap_jobctl_reports_where_it_is(
    small_fs: Path, keys: Pki, cleanup: list[Server]
) -> None:
    server = start_server(small_fs, keys, "--max-output-per-user", "1G")  # the disk, not a user's share, is full
    cleanup.append(server)
    filler = small_fs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(small_fs).free - (12 << 20)))
    stub = server.stub()
    # 30 MiB of zeros (most of it lost), then, once the test has freed the disk, a last line that is stored
    script = b"head -c 30M /dev/zero; while [ ! -e go ]; do sleep 0.05; done; echo after-the-gap"
    job = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", script]))
    deadline = time.monotonic() + bound(60)
    while stub.Get(pb.GetRequest(id=job.id)).output_bytes < 30 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    filler.unlink()
    (Path(job.workdir) / "go").touch()
    record = stub.Wait(pb.GetRequest(id=job.id), timeout=60)
    assert record.exit_code == 0 and record.output_lost_bytes > 0
    proc = subprocess.run([BIN / "jobctl", "stream", job.id], env=server.env(), capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.endswith(b"after-the-gap\n")
    assert len(proc.stdout) == record.output_bytes - record.output_lost_bytes
    # each gap is said, with where it is: together they are exactly what was lost
    gap = re.compile(r"jobctl: (\d+) bytes missing at byte (\d+) \(lost while the server's disk was full")
    said = gap.findall(proc.stderr.decode())
    assert said and sum(int(n) for n, _ in said) == record.output_lost_bytes, proc.stderr
    assert all(0 < int(at) < record.output_bytes for _, at in said)  # offsets in the job's whole output


def test_a_corrupt_state_dir_is_reported_not_fatal(tmp_path: Path, keys: Pki, cleanup: list[Server]) -> None:
    first = start_server(tmp_path, keys)
    cleanup.append(first)
    good = first.stub().Start(pb.StartRequest(argv=[b"echo", b"good"]))
    first.stub().Wait(pb.GetRequest(id=good.id))
    assert first.stop() == 0
    jobs = first.state_dir / "jobs"
    bad = {"garbage": b"\x00\xffnot json", "truncated": b'{"id": "trunc', "newer": None}
    for name, content in bad.items():
        (jobs / name).mkdir()
        if content is not None:
            (jobs / name / "record.json").write_bytes(content)
    newer = json.loads((jobs / good.id / "record.json").read_text())
    newer.update(id="newer", format=99)
    (jobs / "newer" / "record.json").write_text(json.dumps(newer))
    (jobs / "stray-file").write_text("hello")
    second = restart(first)
    cleanup.append(second)
    assert [j.id for j in second.stub().List(pb.ListRequest()).jobs] == [good.id]
    log = second.log()
    for name in ("garbage", "truncated", "newer", "stray-file"):
        assert f"skipping {name}" in log
        assert (jobs / name).exists()  # never deleted what it could not read
    assert second.stop() == 0


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("instance", "not an id\n", "holds no instance id"),
        ("format", "99\n", "written by a newer jobsvc"),
    ],
)
def test_an_unusable_state_dir_is_refused_clearly(
    tmp_path: Path, keys: Pki, file: str, content: str, message: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / file).write_text(content)
    proc = subprocess.run(
        serve_command(keys, "127.0.0.1:0", state, tmp_path / "work"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert (state / file).read_text() == content


def test_sigterm_ends_open_streams_cleanly_and_exits_zero(tmp_path: Path, keys: Pki, cleanup: list[Server]) -> None:
    server = start_server(tmp_path, keys)
    cleanup.append(server)
    job = server.stub().Start(pb.StartRequest(argv=[b"sh", b"-c", b"echo hello; sleep 1000"]))
    api_stream = server.stub().Stream(pb.StreamRequest(id=job.id))
    assert next(api_stream).data == b"hello\n"
    cli = subprocess.Popen(
        [BIN / "jobctl", "stream", "--id", job.id], env=server.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert cli.stdout is not None and cli.stdout.readline() == b"hello\n"
    assert server.stop(signal.SIGTERM) == 0
    assert list(api_stream) == []  # the stream ended, it was not reset
    assert cli.wait(30) == 0
    assert processes_in_cgroup_named(job.id) == []
    record = json.loads((server.state_dir / "jobs" / job.id / "record.json").read_text())
    assert record["status"] == "stopped" and record["reason"] == "server shutting down"
    os.sync()


# -- one server per state dir --------------------------------------------------------------------------------------


def _status_on_disk(server: Server, job_id: str) -> str:
    """The job's status as a restart reads it: its last journal entry (a running job has no record.json)."""
    last, _ = read_journal((server.state_dir / "journal").read_bytes())
    entry = last.get(job_id)
    assert entry is not None, f"the journal has no record of {job_id}"
    return str(entry["status"])


def test_a_second_server_on_a_state_dir_in_use_is_refused_and_changes_nothing(
    tmp_path: Path, keys: Pki, cleanup: list[Server]
) -> None:
    first = start_server(tmp_path, keys)
    cleanup.append(first)
    stub = first.stub()
    job = stub.Start(pb.StartRequest(argv=[b"sleep", b"1000"]))
    procs = processes_in_cgroup_named(job.id)
    assert procs
    second = subprocess.Popen(
        serve_command(keys, "127.0.0.1:0", first.state_dir, tmp_path / "work-2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = second.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        second.kill()
        out, err = second.communicate()
        pytest.fail(
            f"a second server started on a state dir in use ({out.strip()!r}); first job: {procs} -> "
            f"{processes_in_cgroup_named(job.id)}"
        )
    assert second.returncode == 1
    assert err.splitlines() == [f"jobsvc: state dir {first.state_dir} is in use by jobsvc pid {first.pid}"]
    assert out == ""
    # the first server's job, its group and its record are untouched, and the first server goes on working
    assert processes_in_cgroup_named(job.id) == procs
    assert stub.Get(pb.GetRequest(id=job.id)).status == pb.JOB_STATUS_RUNNING
    assert _status_on_disk(first, job.id) == "running"
    echo = stub.Start(pb.StartRequest(argv=[b"echo", b"still mine"]))
    assert stream_all(first, echo.id)[0] == b"still mine\n"
    stub.Stop(pb.StopRequest(id=job.id, grace_seconds=0))
    assert first.stop() == 0


def test_a_server_that_cannot_bind_changes_nothing(tmp_path: Path, keys: Pki, cleanup: list[Server]) -> None:
    import socket

    first = start_server(tmp_path, keys)
    cleanup.append(first)
    job = first.stub().Start(pb.StartRequest(argv=[b"sleep", b"1000"]))
    kill9(first)  # its job lives on until a server takes the state dir over
    orphans = processes_in_cgroup_named(job.id)
    assert orphans
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            serve_command(keys, f"127.0.0.1:{port}", first.state_dir, tmp_path / "work-2"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert "cannot listen" in proc.stderr and "Traceback" not in proc.stderr
    assert processes_in_cgroup_named(job.id) == orphans  # nothing was reconciled before the bind failed
    assert _status_on_disk(first, job.id) == "running"
    second = restart(first)  # a server that can bind takes over as after any crash
    cleanup.append(second)
    record = second.stub().Get(pb.GetRequest(id=job.id))
    assert record.status == pb.JOB_STATUS_STOPPED and record.reason == "server restarted"
    assert processes_in_cgroup_named(job.id) == []


def _fill(path: Path) -> None:
    """Write path until the filesystem refuses another byte."""
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * (1 << 20)
        while True:
            try:
                f.write(block)
            except OSError:
                break
        while len(block) > 1:  # the last partial block too
            block = block[: len(block) // 2]
            try:
                while f.write(block):
                    pass
            except OSError:
                continue


def test_records_a_full_disk_refused_at_shutdown_are_reported_and_fail_the_exit(
    small_state_dir: Path, keys: Pki, cleanup: list[Server]
) -> None:
    server = start_server(small_state_dir, keys)
    cleanup.append(server)
    stub = server.stub()
    sleeper = stub.Start(pb.StartRequest(argv=[b"sleep", b"1000"]))  # will be stopped by the shutdown
    waiter = stub.Start(pb.StartRequest(argv=[b"sh", b"-c", b"while [ ! -e go ]; do sleep 0.05; done; exit 7"]))
    filler = server.state_dir / "filler"
    _fill(filler)
    (Path(waiter.workdir) / "go").touch()  # the working directory is not on the full disk
    ended = stub.Wait(pb.GetRequest(id=waiter.id), timeout=60)
    assert ended.status == pb.JOB_STATUS_FINISHED and ended.exit_code == 7
    assert _status_on_disk(server, waiter.id) == "running"  # its final record did not fit
    code = server.stop()
    assert code != 0, "the server exited 0 with job records it could not write"
    lines = server.log().splitlines()
    for job_id, what in ((waiter.id, "finished (exit 7)"), (sleeper.id, "stopped (server shutting down)")):
        said = [line for line in lines if f"job {job_id}: final record NOT written" in line]
        assert len(said) == 1 and what in said[0], said
    assert "Traceback" not in server.log()
    # What the README says happens next: the restart shows each job as its last written record said.
    filler.unlink()
    again = restart(server)
    cleanup.append(again)
    for job_id in (waiter.id, sleeper.id):
        record = again.stub().Get(pb.GetRequest(id=job_id))
        assert record.status == pb.JOB_STATUS_STOPPED and record.reason == "server restarted"
    assert again.stop() == 0


def test_retention_removes_the_oldest_ended_jobs_with_their_files(
    tmp_path: Path, keys: Pki, cleanup: list[Server]
) -> None:
    server = start_server(
        tmp_path, keys, "--keep-finished", "3", "--max-total-output", "5M", "--max-output-per-user", "5M"
    )
    cleanup.append(server)
    stub, bob = server.stub(), server.stub("bob")
    big = []
    for _ in range(3):  # bob: 2 MiB each, more than 5 MiB in all: the oldest ended job goes
        job = bob.Start(pb.StartRequest(argv=[b"head", b"-c", b"2M", b"/dev/zero"]))
        bob.Wait(pb.GetRequest(id=job.id))
        big.append(job.id)
    mine = []
    for _ in range(6):  # alice: six small jobs, of which her newest three stay
        job = stub.Start(pb.StartRequest(argv=[b"echo", b"hi"]))
        stub.Wait(pb.GetRequest(id=job.id))
        mine.append(job.id)

    def listed(stub: object) -> list[str]:
        return [j.id for j in stub.List(pb.ListRequest()).jobs]  # type: ignore[attr-defined]

    deadline = time.monotonic() + bound(30)
    while (listed(stub) != mine[3:] or listed(bob) != big[1:]) and time.monotonic() < deadline:
        time.sleep(0.1)  # the janitor runs every 2 s
    assert listed(stub) == mine[3:]
    assert listed(bob) == big[1:]

    def left(job_id: str) -> list[Path]:
        return [p for p in (server.state_dir / "jobs" / job_id, server.work_root / job_id) if p.exists()]

    # a removed job's files go in the record writer's threads, right after its tombstone is durable
    while any(left(gone) for gone in [*mine[:3], big[0]]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for gone in [*mine[:3], big[0]]:
        assert left(gone) == []
    for kept in [*mine[3:], *big[1:]]:
        assert (server.state_dir / "jobs" / kept / "record.json").exists()


def test_one_users_output_cannot_fill_the_disk_for_the_others(small_fs: Path, keys: Pki, cleanup: list[Server]) -> None:
    # a 48 MiB state dir: each user's share is a quarter of it (the default); alice's job writes 100 MB
    server = start_server(small_fs, keys)
    cleanup.append(server)
    alice, bob = server.stub("alice"), server.stub("bob")
    hog = alice.Start(pb.StartRequest(argv=[b"head", b"-c", b"100M", b"/dev/zero"]))
    done = alice.Wait(pb.GetRequest(id=hog.id), timeout=120)
    assert done.exit_code == 0  # never blocked
    share = shutil.disk_usage(small_fs).total // 4
    kept = done.output_bytes - done.output_lost_bytes
    assert kept <= share + (1 << 20) and done.output_lost_bytes >= (100 << 20) - share - (1 << 20)
    assert "share of the state dir is full" in server.log()
    # bob is not starved: his Start works and his output is whole
    job = bob.Start(pb.StartRequest(argv=[b"sh", b"-c", b"head -c 4M /dev/zero; echo bob-was-here"]))
    data = b"".join(m.data for m in bob.Stream(pb.StreamRequest(id=job.id), timeout=60))
    assert data == b"\0" * (4 << 20) + b"bob-was-here\n"
    # nor is alice locked out: her oldest ended job makes room at once, and her new output is whole
    again = alice.Start(pb.StartRequest(argv=[b"echo", b"alice-again"]))
    assert b"".join(m.data for m in alice.Stream(pb.StreamRequest(id=again.id), timeout=60)) == b"alice-again\n"
    assert hog.id not in [j.id for j in alice.List(pb.ListRequest()).jobs]


def test_a_full_disk_does_not_cost_the_audit_trail_a_line(small_fs: Path, keys: Pki, cleanup: list[Server]) -> None:
    server = start_server(small_fs, keys)
    cleanup.append(server)
    stub = server.stub()
    job = stub.Start(pb.StartRequest(argv=[b"true"]))
    stub.Wait(pb.GetRequest(id=job.id))
    audit = server.state_dir / "audit.log"
    before = len(audit.read_text().splitlines())
    with open(small_fs / "filler", "wb") as f:  # every free block of the state dir's disk, taken by another program
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    ok = refused = 0
    for _ in range(100):  # each ~200 bytes of audit line: far more than a partly filled last block holds
        try:
            stub.Get(pb.GetRequest(id=job.id))
            ok += 1
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and "audit log" in (e.details() or "")
            refused += 1
    lines = audit.read_text().splitlines()[before:]
    assert len([line for line in lines if '"method": "Get"' in line and '"OK"' in line]) == ok == 100 - refused
    assert ok > 0  # the reserve (about 20,000 lines) took them all
