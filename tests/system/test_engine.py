"""The engine on the real kernel: groups from the first instruction, whole-tree stop, complete output."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from jobsvc.errors import InvalidArgumentError, NotFoundError
from jobsvc.manager import EngineConfig, JobManager
from jobsvc.output import STDERR, STDOUT
from jobsvc.states import JobStatus
from jobsvc.store import Entry
from tests.system.conftest import CGROUP_VERSION, job_group_dirs, processes_in_cgroup_named

JobManagerT = JobManager


async def read_all(engine: JobManager, owner: str, job_id: str, from_offset: int = 0) -> dict[int, bytes]:
    parts: dict[int, list[bytes]] = {STDOUT: [], STDERR: []}
    async for chunk in engine.stream(owner, job_id, from_offset):
        parts[chunk.fd].append(chunk.data)
    return {fd: b"".join(p) for fd, p in parts.items()}


async def test_first_instruction_runs_inside_every_group(engine: JobManager) -> None:
    # cat's very first work is reading /proc/self/cgroup: it must already name the job's groups.
    rec = await engine.start("alice", ["cat", "/proc/self/cgroup"])
    out = (await read_all(engine, "alice", rec.id))[STDOUT].decode()
    lines = {}
    for line in out.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(","):
            lines[c] = path
    # v1: a line per hierarchy; v2: the one unified line ("0::/path")
    wanted = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer") if CGROUP_VERSION == "v1" else ("",)
    for c in wanted:
        assert lines[c].endswith(f"/jobsvc/{engine.instance_groups[0].name}/{rec.id}"), (c, out)
    assert (await engine.wait("alice", rec.id)).exit_code == 0


async def test_groups_a_job_made_beneath_its_own_are_killed_and_removed(engine: JobManager) -> None:
    # A root job may make groups beneath its own and move processes there (here the test does it for the job):
    # Stop still finds and kills those processes, and removes those groups too.
    rec = await engine.start("root", ["sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    for _ in range(200):
        if len(processes_in_cgroup_named(rec.id)) >= 3:
            break
        await asyncio.sleep(0.01)
    sleepers = [p for p in processes_in_cgroup_named(rec.id) if p != rec.pid]
    assert len(sleepers) == 2
    for d in job_group_dirs(engine, rec.id):  # every hierarchy (v1) or the one group (v2)
        (d / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
        (d / "sub" / "cgroup.procs").write_text(str(sleepers[0]))
        (d / "sub" / "deeper" / "cgroup.procs").write_text(str(sleepers[1]))
    stopped = await engine.stop("root", rec.id, grace=0.2)
    assert stopped.status is JobStatus.STOPPED
    assert processes_in_cgroup_named(rec.id) == []
    for pid in sleepers:
        with contextlib.suppress(FileNotFoundError):
            assert Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", "a process in a sub-group survived"
    assert not any(d.exists() for d in job_group_dirs(engine, rec.id))


async def test_stop_kills_the_whole_tree_and_removes_the_groups(engine: JobManager) -> None:
    rec = await engine.start("alice", ["sh", "-c", "sleep 1000 & sleep 1000 & (sleep 1000 & wait) & wait"])
    for _ in range(200):  # until the tree is built: sh, 3 sleeps, a subshell
        if len(processes_in_cgroup_named(rec.id)) >= 5:
            break
        await asyncio.sleep(0.01)
    assert len(processes_in_cgroup_named(rec.id)) >= 5
    assert all(d.exists() for d in job_group_dirs(engine, rec.id))
    stopped = await engine.stop("alice", rec.id, grace=2.0)
    assert stopped.status is JobStatus.STOPPED
    assert stopped.reason == "stopped by owner"
    assert stopped.signal == signal.SIGTERM and stopped.exit_code is None
    assert processes_in_cgroup_named(rec.id) == []
    assert not any(d.exists() for d in job_group_dirs(engine, rec.id))
    # stopping an ended job returns its record unchanged
    assert await engine.stop("alice", rec.id) == stopped


async def test_stop_escalates_to_sigkill_after_grace(engine: JobManager) -> None:
    rec = await engine.start("alice", ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"])
    async for _ in engine.stream("alice", rec.id):
        break  # the trap is set
    stopped = await engine.stop("alice", rec.id, grace=0.3)
    assert stopped.signal == signal.SIGKILL
    assert processes_in_cgroup_named(rec.id) == []


async def test_exit_codes_and_signals_are_reported(engine: JobManager) -> None:
    seven = await engine.start("alice", ["sh", "-c", "exit 7"])
    killed = await engine.start("alice", ["sh", "-c", "kill -TERM $$"])
    r7 = await engine.wait("alice", seven.id)
    rk = await engine.wait("alice", killed.id)
    assert (r7.status, r7.exit_code, r7.signal, r7.reason) == (JobStatus.FINISHED, 7, None, None)
    assert (rk.status, rk.exit_code, rk.signal) == (JobStatus.FINISHED, None, signal.SIGTERM)
    assert r7.ended_at is not None and r7.ended_at >= r7.started_at
    assert not any(d.exists() for d in job_group_dirs(engine, seven.id))


async def test_exec_failures_fail_start_naming_the_cause(engine: JobManager, tmp_path: Path) -> None:
    not_exec = "/etc/passwd"  # a plain file outside /tmp and /var/tmp (jobs have private ones)
    before = sorted(p.name for p in engine.instance_groups[0].iterdir() if p.is_dir())
    with pytest.raises(InvalidArgumentError, match="No such file or directory"):
        await engine.start("alice", ["/no/such/program"])
    with pytest.raises(InvalidArgumentError, match="No such file or directory"):
        await engine.start("alice", ["no-such-command-anywhere"])
    with pytest.raises(InvalidArgumentError, match="Permission denied"):
        await engine.start("alice", [not_exec])
    with pytest.raises(InvalidArgumentError, match="Permission denied"):
        await engine.start("alice", ["/etc"])  # a directory
    for bad in ([], [""], ["echo", "a\0b"]):
        with pytest.raises(InvalidArgumentError):
            await engine.start("alice", bad)
    assert sorted(p.name for p in engine.instance_groups[0].iterdir() if p.is_dir()) == before
    assert engine.list("alice") == []


async def test_twenty_live_readers_and_a_late_one_get_identical_bytes(engine: JobManager, tmp_path: Path) -> None:
    rec = await engine.start("alice", ["sh", "-c", "head -c 20M /dev/urandom | tee copy"])
    copy = engine.config.work_root / rec.id / "copy"  # written in the job's own working directory
    results = await asyncio.gather(*(read_all(engine, "alice", rec.id) for _ in range(20)))
    expected = hashlib.sha256(copy.read_bytes()).hexdigest()
    assert copy.stat().st_size == 20 << 20
    for r in results:
        assert hashlib.sha256(r[STDOUT]).hexdigest() == expected
        assert r[STDERR] == b""
    late = await read_all(engine, "alice", rec.id)
    assert hashlib.sha256(late[STDOUT]).hexdigest() == expected
    # resuming from an offset gives exactly the rest
    rest = await read_all(engine, "alice", rec.id, from_offset=12345)
    assert rest[STDOUT] == copy.read_bytes()[12345:]


async def test_stdout_and_stderr_are_told_apart_and_ordered(engine: JobManager) -> None:
    script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done"
    rec = await engine.start("alice", ["sh", "-c", script])
    out = await read_all(engine, "alice", rec.id)
    assert out[STDOUT] == b"".join(b"out%d\n" % i for i in range(1, 6))
    assert out[STDERR] == b"".join(b"err%d\n" % i for i in range(1, 6))


# signals 32 and 33 are glibc's own (thread cancellation, setxid): sigaction refuses to change them, so no
# launcher (systemd's reset of all signal handlers included) can reset what its parent left there
GLIBC_INTERNAL = (1 << 31) | (1 << 32)


async def test_a_job_starts_with_default_signals_an_empty_mask_and_no_new_privs(engine: JobManager) -> None:
    # the spawn helper ignores SIGINT and Python ignores SIGPIPE and SIGXFSZ, and pytest has handlers of its own:
    # none of it may reach the job (cat installs no handlers, so every mask must read zero)
    rec = await engine.start("alice", ["cat", "/proc/self/status"])
    lines = (await read_all(engine, "alice", rec.id))[STDOUT].decode().splitlines()
    status = dict(line.split(":\t", 1) for line in lines)
    masks = {k: int(status[k], 16) & ~GLIBC_INTERNAL for k in ("SigIgn", "SigBlk", "SigCgt")}
    assert masks == {"SigIgn": 0, "SigBlk": 0, "SigCgt": 0}, {k: status[k].strip() for k in masks}
    assert status["NoNewPrivs"].strip() == "1"


async def test_binary_output_early_close_and_children_holding_the_pipe(engine: JobManager) -> None:
    binary = await engine.start("alice", ["printf", "\\000\\377\\001"])
    closes = await engine.start("alice", ["sh", "-c", "exec >&-; sleep 0.3; echo bye >&2"])
    orphans = await engine.start("alice", ["sh", "-c", "sleep 1000 & sleep 1000 & echo started"])
    assert (await read_all(engine, "alice", binary.id))[STDOUT] == b"\x00\xff\x01"
    assert (await read_all(engine, "alice", closes.id)) == {STDOUT: b"", STDERR: b"bye\n"}
    out = await asyncio.wait_for(read_all(engine, "alice", orphans.id), 10)
    assert out[STDOUT] == b"started\n"
    rec = await engine.wait("alice", orphans.id)
    assert rec.status is JobStatus.FINISHED and rec.exit_code == 0
    assert processes_in_cgroup_named(orphans.id) == []  # the leader's end ended its children too
    assert not any(d.exists() for d in job_group_dirs(engine, orphans.id))


async def test_owners_see_only_their_own_jobs(engine: JobManager) -> None:
    rec = await engine.start("CN=bob", ["sleep", "1000"])
    with pytest.raises(NotFoundError) as theirs:
        engine.get("CN=alice", rec.id)
    with pytest.raises(NotFoundError) as missing:
        engine.get("CN=alice", "00000000-0000-4000-8000-000000000000")
    assert str(theirs.value) == str(missing.value)
    with pytest.raises(NotFoundError):
        await engine.stop("CN=alice", rec.id)
    with pytest.raises(NotFoundError):
        engine.stream("CN=alice", rec.id)
    assert engine.list("CN=alice") == []
    assert [r.id for r in engine.list("CN=bob")] == [rec.id]
    assert engine.get("CN=bob", rec.id[:8]).id == rec.id  # a unique prefix works for the owner
    assert engine.get("CN=bob", rec.id).status is JobStatus.RUNNING


RSS_PROBE = """
import asyncio, json, sys
from collections.abc import Iterable
from pathlib import Path
from jobsvc.manager import EngineConfig, JobManager

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

async def main():
    engine = JobManager.open(EngineConfig(state_dir=Path(sys.argv[1]), work_root=Path(sys.argv[2])))
    start_rss = rss()
    rec = await engine.start("alice", ["head", "-c", "1G", "/dev/zero"])
    peak, total = rss(), 0
    async for chunk in engine.stream("alice", rec.id):
        total += len(chunk.data)
        if total % (16 << 20) < len(chunk.data):
            peak = max(peak, rss())
    final = await engine.wait("alice", rec.id)
    peak = max(peak, rss())
    await engine.shutdown()
    print(json.dumps({"start": start_rss, "peak": peak, "streamed": total, "output_bytes": final.output_bytes}))

asyncio.run(main())
"""


def test_memory_stays_flat_while_a_job_writes_a_gibibyte(tmp_path: Path, work_root: Path) -> None:
    # A fresh process, so the figure is the engine's own, not what earlier tests left in pytest's heap.
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(tmp_path / "state"), str(work_root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["streamed"] == result["output_bytes"] == 1 << 30
    assert result["peak"] < 150 << 20, f"RSS reached {result['peak'] >> 20} MiB"


async def test_two_engines_on_one_host_do_not_touch_each_other(engine: JobManager, tmp_path: Path) -> None:
    other = JobManager.open(EngineConfig(state_dir=tmp_path / "other-state", work_root=engine.config.work_root))
    try:
        assert set(engine.instance_groups).isdisjoint(other.instance_groups)
        mine = await engine.start("alice", ["sleep", "1000"])
        theirs = await other.start("alice", ["sleep", "1000"])
        with pytest.raises(NotFoundError):
            other.get("alice", mine.id)
        await other.shutdown(grace=0.5)
        assert processes_in_cgroup_named(theirs.id) == []
        assert engine.get("alice", mine.id).status is JobStatus.RUNNING
        assert processes_in_cgroup_named(mine.id) != []
    finally:
        await other.shutdown(grace=0.5)
    assert os.path.isdir(job_group_dirs(engine, mine.id)[0])


async def test_a_dead_spawn_helper_is_replaced_and_its_jobs_do_not_linger(engine: JobManager) -> None:
    orphan = await engine.start("alice", ["sleep", "1000"])
    old_helper = engine.helper_pid
    os.kill(old_helper, signal.SIGKILL)
    ended = await asyncio.wait_for(engine.wait("alice", orphan.id), 20)
    assert ended.status is JobStatus.STOPPED and ended.reason == "spawn helper died"
    assert processes_in_cgroup_named(orphan.id) == []
    fresh = await engine.start("alice", ["echo", "still starting jobs"])
    assert engine.helper_pid != old_helper
    assert (await read_all(engine, "alice", fresh.id))[STDOUT] == b"still starting jobs\n"


async def test_the_janitor_returns_freed_memory_once_the_last_stream_ends(
    tmp_path: Path, work_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobsvc.manager

    trims: list[int] = []

    def trim() -> bool:
        trims.append(1)
        return True

    monkeypatch.setattr(jobsvc.manager, "release_free_heap", trim)
    m = JobManager.open(EngineConfig(state_dir=tmp_path / "state", work_root=work_root, janitor_interval=0.02))
    await m.reconcile()
    try:
        job = await m.start("alice", ["sh", "-c", "head -c 3000000 /dev/zero; sleep 0.3; echo end"])
        readers = [m.stream("alice", job.id) for _ in range(3)]
        first = [await anext(r) for r in readers]  # three streams open
        assert all(c.data for c in first)
        await asyncio.sleep(0.1)
        assert trims == [], "trimmed while streams were open"
        for r in readers:
            async for _ in r:
                pass
        await asyncio.sleep(0.2)
        assert trims == [1], "one trim after the last stream ended"
        await asyncio.sleep(0.1)
        assert trims == [1], "no trim without new streams"
    finally:
        await m.shutdown(grace=0.5)


async def test_records_are_written_off_the_event_loop_and_start_waits_for_its_own(
    engine: JobManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    other = await engine.start("alice", ["sleep", "100"])
    store = engine._store  # a slow disk on purpose: the store's commit is where the fdatasync happens
    real_commit = store.commit
    entered, release = threading.Event(), threading.Event()
    loop_thread = threading.get_ident()
    committed_on: list[int] = []

    def slow_commit(entries: Sequence[Entry]) -> None:  # an fsync stuck behind a busy journal
        committed_on.append(threading.get_ident())
        entered.set()
        release.wait(10)
        real_commit(entries)

    monkeypatch.setattr(store, "commit", slow_commit)
    starting = asyncio.ensure_future(engine.start("alice", ["sleep", "100"]))
    while not entered.is_set():  # the loop runs while the write waits in its thread
        await asyncio.sleep(0.01)
    assert not starting.done(), "Start answered before its record was on disk"
    assert engine.get("alice", other.id).status is JobStatus.RUNNING  # other calls go on meanwhile
    release.set()
    started = await starting
    assert store.load(started.id) == started  # durable (in the journal: a running job has no record.json)
    assert loop_thread not in committed_on
    monkeypatch.setattr(store, "commit", real_commit)
    for job_id in (other.id, started.id):
        await engine.stop("alice", job_id, grace=0)


async def test_a_work_root_under_tmp_works_though_jobs_get_a_private_tmp(tmp_path: Path) -> None:
    # The private /tmp and /var/tmp are directories of the work root; here it lies under /tmp itself, which the
    # first of them covers in the job's namespace.
    root = Path(tempfile.mkdtemp(prefix="jobsvc-test-", dir="/tmp"))
    try:
        manager = JobManager.open(EngineConfig(state_dir=tmp_path / "state", work_root=root))
        await manager.reconcile()
        try:
            mine = f"mine-{os.getpid()}"
            script = f"pwd; touch /tmp/{mine} /var/tmp/{mine} && echo made"
            rec = await manager.start("alice", ["sh", "-c", script])
            done = await manager.wait("alice", rec.id)
            out = b"".join([c.data async for c in manager.stream("alice", rec.id)]).decode()
            assert done.exit_code == 0, out
            assert out.split() == [str(root / rec.id), "made"]
            assert not (Path("/tmp") / mine).exists() and not (Path("/var/tmp") / mine).exists()
        finally:
            await manager.shutdown(grace=1.0)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_an_engine_whose_helper_does_not_start_leaves_no_groups(
    tmp_path: Path, work_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobsvc.cgroups.base import locate
    from jobsvc.spawn import HelperSpawner

    def no_helper() -> HelperSpawner:
        raise OSError(11, "Resource temporarily unavailable")  # as fork() fails when the host is out of processes

    monkeypatch.setattr(HelperSpawner, "launch", staticmethod(no_helper))
    with pytest.raises(OSError):
        JobManager.open(EngineConfig(state_dir=tmp_path / "state", work_root=work_root))
    instance = (tmp_path / "state" / "instance").read_text().strip()
    left = [d for d in locate(instance, Path("/proc/self")) if d.exists()]
    assert not left, left
