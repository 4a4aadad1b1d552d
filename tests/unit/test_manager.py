"""The engine over fakes (tests/unit/fakes.py): lifecycle, quotas, helper death, reconcile and retention, no root.

The real cgroups, spawn helper and uids are the system tests' (tests/system/test_engine.py and others); here the
JobManager itself is under test: what it asks its edges for, what it undoes, what it records and removes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import shutil
import signal
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from jobsvc.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError
from jobsvc.manager import BASE_ENV, JOB_UMASK
from jobsvc.model import JobRecord, Limits
from jobsvc.output import STDERR, STDOUT
from jobsvc.spawn import SpawnError
from jobsvc.states import JobStatus
from jobsvc.store import Entry
from tests.unit.fakes import Engine, FakeClock, FakeDriver, FakeProcess, exited, make_engine, no_such_file

ALICE, BOB = "CN=alice", "CN=bob"


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    e = make_engine(tmp_path)
    await e.manager.reconcile()
    yield e
    await e.manager.shutdown(grace=0)


async def output_of(e: Engine, owner: str, job_id: str) -> dict[int, bytes]:
    out = {STDOUT: b"", STDERR: b""}
    async for chunk in e.manager.stream(owner, job_id, follow=False):
        out[chunk.fd] += chunk.data
    return out


async def captured(e: Engine, owner: str, job_id: str, size: int) -> None:
    """Until the engine has taken size bytes of the job's output from its pipes."""
    while e.manager.get(owner, job_id).output_bytes < size:
        await asyncio.sleep(0)


async def settled(e: Engine, job_id: str) -> None:
    """Until the engine's bookkeeping after the job's end is done (its private dirs' removal is the last step)."""
    while job_id not in e.work.private_removed:
        await asyncio.sleep(0.001)


async def supervised(job_id: str) -> None:
    """Until the job's supervision (the task that ends it, named job-<id>) is over."""
    while any(t.get_name() == f"job-{job_id}" for t in asyncio.all_tasks()):
        await asyncio.sleep(0.001)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- start, end, stop, timeout -----------------------------------------------------------------------------------


async def test_start_asks_each_edge_for_the_job_and_records_it_on_disk(engine: Engine) -> None:
    rec = await engine.manager.start(
        ALICE, ["sh", "-c", "true"], Limits(memory_bytes=64 << 20), env={"GREETING": "hi"}, timeout=30
    )
    (request,) = engine.spawner.requests
    group = engine.group(rec.id)
    home = engine.work.root / rec.id
    assert request.argv == (b"sh", b"-c", b"true")
    assert request.env == {**BASE_ENV, b"HOME": os.fsencode(home), b"GREETING": b"hi"}
    assert request.cwd == os.fsencode(home) and request.umask == JOB_UMASK
    assert request.join_files == group.join_files
    assert request.uid == request.gid == rec.uid and rec.uid in engine.users.held
    assert request.private_dirs is not None and rec.id in request.private_dirs[0]
    assert group.limits.memory_bytes == 64 << 20
    assert (rec.status, rec.pid, rec.workdir, rec.timeout_seconds) == (
        JobStatus.RUNNING,
        engine.process(rec.id).pid,
        str(home),
        30,
    )
    assert engine.store.load(rec.id) == rec  # acknowledged once on disk
    assert not (engine.store.job_dir(rec.id) / "record.json").exists()  # in the journal only while it runs


async def test_a_job_that_ends_by_itself_gives_everything_back(engine: Engine) -> None:
    rec = await engine.manager.start(ALICE, ["job"])
    proc = engine.process(rec.id)
    await proc.write(b"to stdout\n")
    await proc.write(b"to stderr\n", stream=STDERR)
    proc.exit(exited(3))
    done = await engine.manager.wait(ALICE, rec.id)
    assert (done.status, done.exit_code, done.signal, done.reason) == (JobStatus.FINISHED, 3, None, None)
    assert done.usage == engine.group(rec.id).used
    assert await output_of(engine, ALICE, rec.id) == {STDOUT: b"to stdout\n", STDERR: b"to stderr\n"}
    assert engine.store.load(rec.id) == done  # the final record reached the disk
    await settled(engine, rec.id)
    assert engine.store._load_from(str(engine.store.job_dir(rec.id) / "record.json")) == done  # and its mirror
    group = engine.group(rec.id)
    assert group.kills >= 1 and group.destroyed  # the rest of its group went with the leader
    assert engine.users.held == set() and engine.work.retired == [rec.id] and engine.work.private_removed == [rec.id]


async def test_the_leaders_end_ends_the_rest_of_its_group(engine: Engine) -> None:
    rec = await engine.manager.start(ALICE, ["job"])
    child = engine.process(rec.id)
    leader_group = engine.group(rec.id)
    straggler = FakeProcess(child.pid + 1, None, None, frozenset({signal.SIGTERM}))
    leader_group.processes.append(straggler)
    child.exit(exited(0))
    await engine.manager.wait(ALICE, rec.id)
    assert not straggler.alive and straggler.received == [signal.SIGKILL]


async def test_stop_signals_the_whole_job_and_returns_once_it_is_gone(engine: Engine) -> None:
    rec = await engine.manager.start(ALICE, ["job"])
    stopped = await engine.manager.stop(ALICE, rec.id[:8], grace=5)
    assert (stopped.status, stopped.signal, stopped.reason) == (JobStatus.STOPPED, signal.SIGTERM, "stopped by owner")
    assert engine.group(rec.id).signals == [signal.SIGTERM]
    assert await engine.manager.stop(ALICE, rec.id) == stopped  # an ended job comes back unchanged
    assert engine.group(rec.id).signals == [signal.SIGTERM]


async def test_stop_kills_what_ignores_the_first_signal_after_the_grace(engine: Engine) -> None:
    engine.spawner.ignores = frozenset({signal.SIGINT})
    rec = await engine.manager.start(ALICE, ["job"])
    stopped = await engine.manager.stop(ALICE, rec.id, grace=0.01, sig=signal.SIGINT)
    assert (stopped.status, stopped.signal) == (JobStatus.STOPPED, signal.SIGKILL)
    assert engine.process(rec.id).received == [signal.SIGINT, signal.SIGKILL]


@pytest.mark.parametrize(("grace", "sig"), [(-1, None), (3601, None), (None, 0), (None, signal.NSIG)])
async def test_stop_refuses_a_bad_grace_or_signal(engine: Engine, grace: float | None, sig: int | None) -> None:
    rec = await engine.manager.start(ALICE, ["job"])
    with pytest.raises(InvalidArgumentError):
        await engine.manager.stop(ALICE, rec.id, grace=grace, sig=sig)
    assert engine.group(rec.id).signals == []


async def test_a_job_over_its_timeout_is_stopped_with_reason_timeout(engine: Engine) -> None:
    rec = await engine.manager.start(ALICE, ["job"], timeout=0.01)
    done = await engine.manager.wait(ALICE, rec.id)
    assert (done.status, done.reason, done.signal) == (JobStatus.STOPPED, "timeout", signal.SIGTERM)


async def test_the_servers_default_timeout_applies_to_a_start_without_one(tmp_path: Path) -> None:
    e = make_engine(tmp_path, default_timeout=0.01)
    await e.manager.reconcile()
    rec = await e.manager.start(ALICE, ["job"])
    assert rec.timeout_seconds == 0.01
    assert (await e.manager.wait(ALICE, rec.id)).reason == "timeout"
    await e.manager.shutdown(grace=0)


async def test_a_kill_at_the_memory_limit_reads_as_oom(engine: Engine) -> None:
    rec = await engine.manager.start(ALICE, ["job"], Limits(memory_bytes=16 << 20))
    engine.group(rec.id).oom = 1
    engine.process(rec.id).signal(signal.SIGKILL)
    done = await engine.manager.wait(ALICE, rec.id)
    assert (done.status, done.reason, done.oom_killed, done.signal) == (
        JobStatus.FINISHED,
        "oom",
        True,
        signal.SIGKILL,
    )


# -- a Start that fails undoes itself ------------------------------------------------------------------------------


async def assert_undone(e: Engine, job_id: str, fds_before: int) -> None:
    assert e.manager.list(ALICE) == []
    await e.manager.settled()  # files are removed in the record writer's threads
    assert not e.store.job_dir(job_id).exists()
    assert job_id in e.work.removed and e.users.held == set()
    assert open_fds() == fds_before  # both pipes closed, no output file left open
    group = e.driver.groups.get(job_id)
    assert group is None or (group.kills >= 1 and group.destroyed)


async def test_a_command_that_cannot_exec_is_an_invalid_argument_and_undone(engine: Engine) -> None:
    engine.ids.append("0000aaaa-exec")
    engine.spawner.fail = no_such_file()
    fds = open_fds()
    with pytest.raises(InvalidArgumentError, match="cannot execute 'nope': No such file or directory"):
        await engine.manager.start(ALICE, ["nope"])
    await assert_undone(engine, "0000aaaa-exec", fds)


async def test_a_start_that_fails_after_its_record_was_queued_answers_once_its_tombstone_is_durable(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start record is queued at the fork; an exec that then fails must not be answered before the tombstone
    is on disk, or a crash in between brings back a job its client was told did not start."""
    engine.ids.append("0000aaaa-late")
    engine.spawner.fail = no_such_file()  # the fake tells the fork first, as the helper does
    held, reached = threading.Event(), threading.Event()
    real_commit = engine.store.commit

    def commit(entries: Sequence[Entry]) -> None:
        if any(e.removed and e.job_id == "0000aaaa-late" for e in entries):
            reached.set()
            held.wait(10)
        real_commit(entries)

    monkeypatch.setattr(engine.store, "commit", commit)
    call = asyncio.ensure_future(engine.manager.start(ALICE, ["nope"]))
    assert await asyncio.to_thread(reached.wait, 10)
    await asyncio.sleep(0.05)
    assert not call.done()  # the tombstone is not durable yet: nor is the failure answered
    held.set()
    with pytest.raises(InvalidArgumentError, match="cannot execute 'nope'"):
        await call
    journal = (engine.store.root / "journal").read_bytes()
    assert b'"0000aaaa-late"' in journal and journal.rstrip().endswith(b'{"removed": "0000aaaa-late"}')


async def test_a_workdir_the_user_cannot_enter_is_named(engine: Engine) -> None:
    engine.spawner.fail = SpawnError(errno.EACCES, "cwd", "")
    with pytest.raises(InvalidArgumentError, match="cannot enter working directory '/root' as the job's user"):
        await engine.manager.start(ALICE, ["ls"], workdir="/root")


async def test_refused_limits_undo_the_uid_and_directories(engine: Engine) -> None:
    engine.ids.append("0000aaaa-limits")
    engine.driver.refuse = "memory: the kernel refused it"
    fds = open_fds()
    with pytest.raises(InvalidArgumentError, match="the kernel refused it"):
        await engine.manager.start(ALICE, ["job"])
    await assert_undone(engine, "0000aaaa-limits", fds)


async def test_a_full_state_disk_at_the_record_is_resource_exhausted_and_undone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.ids.append("0000aaaa-full")

    def full(record: JobRecord, payload: bytes) -> str:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine.store, "stage", full)  # the record's file is written before the journal names it
    fds = open_fds()
    with pytest.raises(ResourceExhaustedError, match="state directory is full"):
        await engine.manager.start(ALICE, ["job"])
    proc = engine.process("0000aaaa-full")
    assert not proc.alive and proc.received == [signal.SIGKILL]  # it had started: its group was emptied
    monkeypatch.undo()  # the disk has room again when the killed job's end comes
    await supervised("0000aaaa-full")
    await engine.manager.settled()  # the failed Start's removal deletes its files in the writer's thread
    assert not engine.store.job_dir("0000aaaa-full").exists()  # its end wrote no record of a job never started
    engine.manager.collect_garbage()
    await engine.manager.settled()
    assert not engine.store.job_dir("0000aaaa-full").exists()
    assert engine.manager.list(ALICE) == []
    await engine.manager.settled()  # its files are removed in the record writer's threads
    assert "0000aaaa-full" in engine.work.removed and engine.users.held == set()
    assert open_fds() == fds


async def test_a_start_whose_caller_goes_away_completes_and_stays_listed(engine: Engine) -> None:
    engine.spawner.hold = asyncio.get_running_loop().create_future()
    call = asyncio.ensure_future(engine.manager.start(ALICE, ["job"]))
    await asyncio.sleep(0)
    call.cancel()
    engine.spawner.hold.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.gather(*engine.manager._launching)
    (rec,) = engine.manager.list(ALICE)
    # on disk as it was started: the same record but for usage, which a running job's record has as of now
    assert rec.status is JobStatus.RUNNING and dataclasses.replace(engine.store.load(rec.id), usage=rec.usage) == rec


async def test_validation_refuses_before_anything_is_taken(engine: Engine) -> None:
    with pytest.raises(InvalidArgumentError, match="command is empty"):
        await engine.manager.start(ALICE, [])
    with pytest.raises(InvalidArgumentError, match="LD_PRELOAD is not allowed"):
        await engine.manager.start(ALICE, ["job"], env={"LD_PRELOAD": "x.so"})
    assert engine.driver.groups == {} and engine.users.held == set() and engine.spawner.requests == []


async def test_no_start_once_shutting_down(engine: Engine) -> None:
    await engine.manager.shutdown(grace=0)
    with pytest.raises(UnavailableError):
        await engine.manager.start(ALICE, ["job"])


# -- quotas --------------------------------------------------------------------------------------------------------


async def test_running_jobs_are_counted_per_user_and_in_all(tmp_path: Path) -> None:
    e = make_engine(tmp_path, max_running_per_user=2, max_running_total=3)
    await e.manager.reconcile()
    first = await e.manager.start(ALICE, ["job"])
    await e.manager.start(ALICE, ["job"])
    with pytest.raises(ResourceExhaustedError, match="at most 2 running jobs per user"):
        await e.manager.start(ALICE, ["job"])
    await e.manager.start(BOB, ["job"])
    with pytest.raises(ResourceExhaustedError, match="at most 3 running jobs on this server"):
        await e.manager.start(BOB, ["job"])
    e.spawner.fail = no_such_file()
    e.process(first.id).exit(exited(0))
    await e.manager.wait(ALICE, first.id)
    await settled(e, first.id)
    with pytest.raises(InvalidArgumentError):  # a failed Start gives its slot back too
        await e.manager.start(ALICE, ["job"])
    e.spawner.fail = None
    await e.manager.start(ALICE, ["job"])
    await e.manager.shutdown(grace=0)


async def test_concurrent_streams_are_counted_per_user(tmp_path: Path) -> None:
    e = make_engine(tmp_path, max_streams_per_user=1)
    await e.manager.reconcile()
    rec = await e.manager.start(ALICE, ["job"])
    await e.process(rec.id).write(b"x")
    await captured(e, ALICE, rec.id, 1)
    first = e.manager.stream(ALICE, rec.id)
    assert (await anext(first)).data == b"x"
    with pytest.raises(ResourceExhaustedError, match="at most 1 concurrent streams per user"):
        await anext(e.manager.stream(ALICE, rec.id))
    with pytest.raises(NotFoundError):  # nor does another user's stream count: it does not start
        e.manager.stream(BOB, rec.id)
    await first.aclose()  # type: ignore[attr-defined]
    assert [c.data async for c in e.manager.stream(ALICE, rec.id, follow=False)] == [b"x"]
    await e.manager.shutdown(grace=0)


# -- the spawn helper dies -----------------------------------------------------------------------------------------


async def test_the_helpers_death_ends_its_jobs_and_the_next_start_gets_a_new_helper(engine: Engine) -> None:
    old = engine.spawner
    jobs = [await engine.manager.start(ALICE, ["job"]) for _ in range(2)]
    old.die()
    for rec in jobs:
        done = await engine.manager.wait(ALICE, rec.id)
        assert (done.status, done.reason, done.signal) == (JobStatus.STOPPED, "spawn helper died", signal.SIGKILL)
        assert not engine.process(rec.id).alive  # killed with its group
    rec = await engine.manager.start(ALICE, ["job"])
    assert old.closed and old.replaced_by is not None
    assert engine.manager.helper_pid == old.replaced_by.pid
    assert [p.pid for p in old.replaced_by.processes] == [rec.pid]


# -- reconcile after a restart -------------------------------------------------------------------------------------


async def test_reconcile_stops_what_a_crashed_server_left_running_and_removes_unknown_groups(tmp_path: Path) -> None:
    first = make_engine(tmp_path / "before")
    await first.manager.reconcile()
    ended = await first.manager.start(ALICE, ["done"])
    first.process(ended.id).exit(exited(0))
    await first.manager.wait(ALICE, ended.id)
    running = await first.manager.start(BOB, ["runs"])
    await first.process(running.id).write(b"partial")
    await captured(first, BOB, running.id, 7)
    # what a crash leaves: the state dir as it is now (the running job's record says running), its groups
    crashed = tmp_path / "after"
    shutil.copytree(first.manager.config.state_dir, crashed / "state")
    await first.manager.shutdown(grace=0)

    driver = FakeDriver(left_over=[running.id, "orphan-group"])
    driver.groups[running.id].processes.append(FakeProcess(7, None, None, frozenset()))  # still in its group
    clock = FakeClock(first.clock.now)
    clock.advance(60)
    second = make_engine(crashed, driver=driver, clock=clock)
    await second.manager.reconcile()
    try:
        after = second.manager.get(BOB, running.id)
        assert (after.status, after.reason, after.ended_at) == (JobStatus.STOPPED, "server restarted", clock.now)
        assert second.store.load(running.id) == after
        assert (await output_of(second, BOB, running.id))[STDOUT] == b"partial"
        for job_id in (running.id, "orphan-group"):
            group = driver.groups[job_id]
            assert group.kills == 1 and group.destroyed and group.pids() == []
        assert second.work.retired == [running.id] and second.work.private_removed == [running.id]
        assert second.manager.get(ALICE, ended.id) == first.store.load(ended.id)
        assert driver.existing() == []
    finally:
        await second.manager.shutdown(grace=0)


async def test_reconcile_saves_the_jobs_it_took_over_in_shared_commits(tmp_path: Path) -> None:
    first = make_engine(tmp_path / "before")
    await first.manager.reconcile()
    running = [await first.manager.start(BOB, ["runs"]) for _ in range(6)]
    crashed = tmp_path / "after"
    shutil.copytree(first.manager.config.state_dir, crashed / "state")  # what a crash leaves: all six running
    await first.manager.shutdown(grace=0)

    second = make_engine(crashed)
    loop, free = asyncio.get_running_loop(), threading.Event()
    batches: list[int] = []
    real_commit = second.store.commit

    def commit(entries: Sequence[Entry]) -> None:
        if not batches:  # the first commit waits until the loop runs again: everything it queued is queued
            loop.call_soon_threadsafe(free.set)
            free.wait(5)
        batches.append(len(entries))
        real_commit(entries)

    second.store.commit = commit  # type: ignore[method-assign]
    await second.manager.reconcile()
    try:
        assert sum(batches) == 6 and len(batches) <= 2, f"one commit per job taken over: {batches}"
        for rec in running:
            after = second.store.load(rec.id)
            assert (after.status, after.reason) == (JobStatus.STOPPED, "server restarted")
    finally:
        second.store.commit = real_commit  # type: ignore[method-assign]
        await second.manager.shutdown(grace=0)


async def test_reconcile_clears_starts_that_were_never_acknowledged(tmp_path: Path) -> None:
    e = make_engine(tmp_path)
    half = e.store.output_dir("0000aaaa-half")
    half.mkdir(parents=True)
    await e.manager.reconcile()
    await e.manager.settled()  # files are removed in the record writer's threads
    assert not e.store.job_dir("0000aaaa-half").exists()
    assert e.manager.list(ALICE) == []
    await e.manager.shutdown(grace=0)


# -- retention -----------------------------------------------------------------------------------------------------


async def run_to_end(e: Engine, owner: str, output: bytes = b"", advance: float = 1.0) -> JobRecord:
    rec = await e.manager.start(owner, ["job"])
    proc = e.process(rec.id)
    if output:
        await proc.write(output)
    proc.exit(exited(0))
    done = await e.manager.wait(owner, rec.id)
    await settled(e, rec.id)
    e.clock.advance(advance)
    return done


def kept_ids(e: Engine, owner: str) -> list[str]:
    return [r.id for r in e.manager.list(owner)]


async def gone(e: Engine, owner: str, job_id: str) -> bool:
    await e.manager.settled()  # files are removed in the record writer's threads
    with pytest.raises(NotFoundError):
        e.manager.get(owner, job_id)
    return not e.store.job_dir(job_id).exists() and job_id in e.work.removed


async def test_retention_keeps_the_newest_ended_jobs_per_user(tmp_path: Path) -> None:
    e = make_engine(tmp_path, keep_finished_per_user=2)
    await e.manager.reconcile()
    alice = [await run_to_end(e, ALICE) for _ in range(3)]
    bob = await run_to_end(e, BOB)
    running = await e.manager.start(ALICE, ["job"])
    e.manager.collect_garbage()
    assert await gone(e, ALICE, alice[0].id)
    assert kept_ids(e, ALICE) == [alice[1].id, alice[2].id, running.id] and kept_ids(e, BOB) == [bob.id]
    await e.manager.shutdown(grace=0)


async def test_retention_removes_ended_jobs_older_than_the_age_limit(tmp_path: Path) -> None:
    e = make_engine(tmp_path, keep_finished_seconds=60.0)
    await e.manager.reconcile()
    old = await run_to_end(e, ALICE, advance=30)
    new = await run_to_end(e, ALICE, advance=0)
    e.manager.collect_garbage()
    assert kept_ids(e, ALICE) == [old.id, new.id]
    e.clock.advance(31)  # old ended 61 s ago, new 31 s ago
    e.manager.collect_garbage()
    assert await gone(e, ALICE, old.id) and kept_ids(e, ALICE) == [new.id]
    await e.manager.shutdown(grace=0)


async def test_retention_removes_the_oldest_ended_output_past_the_total(tmp_path: Path) -> None:
    e = make_engine(tmp_path, max_total_output_bytes=3500, max_output_per_user=1 << 20, keep_finished_per_user=None)
    await e.manager.reconcile()
    jobs = [await run_to_end(e, owner, b"x" * 1000) for owner in (ALICE, BOB, ALICE)]
    e.manager.collect_garbage()
    assert [r.id for r in e.manager.list(ALICE) + e.manager.list(BOB)] == [jobs[0].id, jobs[2].id, jobs[1].id]
    running = await e.manager.start(BOB, ["job"])
    await e.process(running.id).write(b"y" * 600)  # a running job's output counts too: 3600 in all
    await captured(e, BOB, running.id, 600)
    e.manager.collect_garbage()
    assert await gone(e, ALICE, jobs[0].id)
    assert kept_ids(e, ALICE) == [jobs[2].id] and kept_ids(e, BOB) == [jobs[1].id, running.id]
    await e.manager.shutdown(grace=0)


async def test_retention_drops_a_running_jobs_oldest_segment_when_only_running_jobs_are_left(tmp_path: Path) -> None:
    segment = 128 << 10  # max_output_bytes 1 MiB: segments of an eighth of it
    total = 2 * segment + 1000
    e = make_engine(tmp_path, max_output_bytes=1 << 20, max_total_output_bytes=total, max_output_per_user=1 << 30)
    await e.manager.reconcile()
    rec = await e.manager.start(ALICE, ["job"])
    await e.process(rec.id).write(b"a" * segment + b"b" * segment + b"c" * 2000)
    await captured(e, ALICE, rec.id, 2 * segment + 2000)
    e.manager.collect_garbage()
    now = e.manager.get(ALICE, rec.id)
    assert (now.status, now.output_dropped_bytes, now.output_bytes) == (JobStatus.RUNNING, segment, 2 * segment + 2000)
    chunks = [c async for c in e.manager.stream(ALICE, rec.id, follow=False)]
    assert chunks[0].offset == segment and b"".join(c.data for c in chunks) == b"b" * segment + b"c" * 2000
    e.manager.collect_garbage()  # it fits now: nothing more goes
    assert e.manager.get(ALICE, rec.id).output_dropped_bytes == segment
    await e.manager.shutdown(grace=0)


async def test_a_user_over_their_share_loses_their_own_oldest_ended_jobs_at_once(tmp_path: Path) -> None:
    e = make_engine(tmp_path, max_output_per_user=3000, keep_finished_per_user=None)
    await e.manager.reconcile()
    alice = [await run_to_end(e, ALICE, b"x" * 1000) for _ in range(2)]
    bob = await run_to_end(e, BOB, b"z" * 2500)
    rec = await e.manager.start(ALICE, ["job"])
    await e.process(rec.id).write(b"y" * 1500)  # 3500 of alice's: over her share while it is captured
    await captured(e, ALICE, rec.id, 1500)
    assert await gone(e, ALICE, alice[0].id)
    assert kept_ids(e, ALICE) == [alice[1].id, rec.id] and kept_ids(e, BOB) == [bob.id]
    await e.manager.shutdown(grace=0)


async def test_retention_waits_for_the_last_reader_of_a_job(tmp_path: Path) -> None:
    e = make_engine(tmp_path, keep_finished_per_user=1)
    await e.manager.reconcile()
    old = await run_to_end(e, ALICE, b"old output")
    reader = e.manager.stream(ALICE, old.id)
    assert (await anext(reader)).data == b"old output"
    new = await run_to_end(e, ALICE)
    e.manager.collect_garbage()
    assert kept_ids(e, ALICE) == [old.id, new.id]  # being streamed: a later round removes it
    await reader.aclose()  # type: ignore[attr-defined]
    e.manager.collect_garbage()
    assert await gone(e, ALICE, old.id)
    await e.manager.shutdown(grace=0)


# -- shutdown ------------------------------------------------------------------------------------------------------


async def test_shutdown_stops_every_running_job_and_lets_go_of_the_edges(tmp_path: Path) -> None:
    e = make_engine(tmp_path)
    await e.manager.reconcile()
    jobs = [await e.manager.start(owner, ["job"]) for owner in (ALICE, BOB)]
    assert await e.manager.shutdown(grace=1.0) == ()
    for rec in jobs:
        on_disk = e.store.load(rec.id)
        assert (on_disk.status, on_disk.reason) == (JobStatus.STOPPED, "server shutting down")
    assert e.driver.instance_removed and e.spawner.closed
    assert e.users.held == set()
