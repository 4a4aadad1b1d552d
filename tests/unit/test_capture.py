"""Capture: a job's pipes moved into its OutputLog by a thread, published to the loop; real pipes and files."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from jobsvc.budget import Budget
from jobsvc.capture import Capture, Threads
from jobsvc.output import LOST, STDERR, STDOUT, Chunk, OutputLog


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def pipes() -> tuple[tuple[int, int], tuple[int, int]]:
    """(stdout read, write), (stderr read, write), as a job's."""
    return os.pipe2(os.O_CLOEXEC), os.pipe2(os.O_CLOEXEC)


async def read_until(chunks: AsyncIterator[Chunk], total: int) -> list[Chunk]:
    """Chunks from a live follower until `total` bytes have come."""
    got: list[Chunk] = []
    while sum(len(c.data) for c in got) < total:
        got.append(await anext(chunks))
    return got


def runs(chunks: list[Chunk]) -> list[tuple[int, bytes]]:
    """(stream, bytes) with neighbouring chunks of one stream joined."""
    out: list[tuple[int, bytes]] = []
    for c in chunks:
        if out and out[-1][0] == c.fd:
            out[-1] = (c.fd, out[-1][1] + c.data)
        else:
            out.append((c.fd, c.data))
    return out


async def test_both_pipes_reach_the_log_in_order_and_done_comes_after_the_last_byte(tmp_path: Path) -> None:
    before, threads = open_fds(), set(threading.enumerate())
    log = OutputLog(tmp_path / "out", segment_size=4096)
    (out_r, out_w), (err_r, err_w) = pipes()
    no_idle = Threads(max_idle=0)  # its thread ends with the capture
    capture = Capture("capture-test", log, Budget(None), ((out_r, STDOUT), (err_r, STDERR)), threads=no_idle)
    capture.start()
    follower = log.follow().__aiter__()
    expected: list[tuple[int, bytes]] = []
    for i in range(6):  # one stream at a time, each seen before the next: the order is the order of writing
        fd, w = (STDOUT, out_w) if i % 2 == 0 else (STDERR, err_w)
        data = bytes([65 + i]) * (3000 + 1000 * i)  # crosses segment boundaries
        os.write(w, data)
        expected.append((fd, data))
        assert runs(await read_until(follower, len(data))) == [(fd, data)]
    os.close(out_w)
    os.close(err_w)
    await capture.done.wait()
    assert log.size == sum(len(d) for _, d in expected)  # everything is visible when done is set
    log.close()
    assert runs([c async for c in log.follow(follow=False)]) == expected
    rest = [c async for c in follower]  # the live reader ends at the close, having missed nothing
    assert rest == []
    capture.join()
    for t in set(threading.enumerate()) - threads:
        t.join(10)  # the capture's, ending now
    assert set(threading.enumerate()) == threads
    assert open_fds() == before  # the pipes, the eventfd and the log's files are all closed


async def test_the_loop_runs_on_while_a_write_is_blocked(tmp_path: Path) -> None:
    # A throttled disk stands here as a splice that waits on an event: the loop's callbacks, a reader and the
    # log's figures all go on meanwhile, and the bytes appear once the write goes through.
    entered, release = threading.Event(), threading.Event()

    class BlockedLog(OutputLog):
        def splice_from(self, fd_tag: int, pipe_fd: int, limit: int) -> int:
            if self.size > 0 and not release.is_set():  # the first write goes through, the second waits
                entered.set()
                release.wait()
            return super().splice_from(fd_tag, pipe_fd, limit)

    log = BlockedLog(tmp_path / "out")
    (out_r, out_w), (err_r, err_w) = pipes()
    capture = Capture("capture-test", log, Budget(None), ((out_r, STDOUT), (err_r, STDERR)))
    capture.start()
    follower = log.follow().__aiter__()
    os.write(out_w, b"first\n")
    assert runs(await read_until(follower, 6)) == [(STDOUT, b"first\n")]
    os.write(out_w, b"second\n")
    await asyncio.get_running_loop().run_in_executor(None, entered.wait)
    called = asyncio.Event()
    asyncio.get_running_loop().call_soon(called.set)
    await called.wait()  # a loop callback completes while the capture thread is blocked in its write
    assert log.size == 6
    assert [c.data async for c in log.follow(follow=False)] == [b"first\n"]
    release.set()
    assert runs(await read_until(follower, 7)) == [(STDOUT, b"second\n")]
    os.close(out_w)
    os.close(err_w)
    await capture.done.wait()
    log.close()


async def test_a_busy_loop_is_asked_once_for_many_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notified = splices = 0
    ended = threading.Event()

    class CountingLog(OutputLog):
        def notify(self) -> None:
            nonlocal notified
            notified += 1
            super().notify()

        def splice_from(self, fd_tag: int, pipe_fd: int, limit: int) -> int:
            nonlocal splices
            splices += 1
            return super().splice_from(fd_tag, pipe_fd, 4096)  # small splices: many of them

        def end_writes(self) -> None:
            super().end_writes()
            ended.set()  # the thread's last write: all its requests to the loop are made

    log = CountingLog(tmp_path / "out")
    (out_r, out_w), (err_r, err_w) = pipes()
    payload = os.urandom(60_000)  # fits the pipe: written before the capture starts
    os.write(out_w, payload)
    os.close(out_w)
    os.close(err_w)
    capture = Capture("capture-test", log, Budget(None), ((out_r, STDOUT), (err_r, STDERR)))
    capture.start()
    ended.wait(30)  # the loop is held here while the thread does all its work
    assert splices >= 15
    await capture.done.wait()
    assert notified <= 2  # one request while the loop was busy, one at the end
    log.close()
    assert b"".join([c.data async for c in log.follow(follow=False)]) == payload


async def test_stop_takes_what_is_there_and_closes_a_pipe_someone_still_holds(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out")
    (out_r, out_w), (err_r, err_w) = pipes()
    capture = Capture("capture-test", log, Budget(None), ((out_r, STDOUT), (err_r, STDERR)))
    capture.start()
    os.close(err_w)
    follower = log.follow().__aiter__()
    os.write(out_w, b"seen\n")
    await read_until(follower, 5)
    os.write(out_w, b"still in the pipe\n")
    capture.stop()  # out_w stays open: without stop() the capture would wait for it forever
    await capture.done.wait()
    assert log.size == len(b"seen\nstill in the pipe\n")
    with pytest.raises(OSError) as e:  # the capture's end of the pipe is closed
        os.write(out_w, b"x")
    assert e.value.errno == errno.EPIPE
    os.close(out_w)
    capture.stop()  # after the end: nothing happens (its eventfd is closed, never written)
    log.close()


async def test_a_full_share_loses_output_counted_where_it_was_and_asks_the_loop_to_reclaim(tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    reclaimed_on: list[int] = []
    budget = Budget(100, lambda: reclaimed_on.append(threading.get_ident()))
    log = OutputLog(tmp_path / "out")
    (out_r, out_w), (err_r, err_w) = pipes()
    lost: list[OSError | None] = []
    capture = Capture("capture-test", log, budget, ((out_r, STDOUT), (err_r, STDERR)), lost.append)
    capture.start()
    follower = log.follow().__aiter__()
    os.write(out_w, b"k" * 150)  # under the share when read: stored, and now over it
    await read_until(follower, 150)
    os.write(err_w, b"d" * 40)  # over the share: dropped
    os.close(err_w)
    os.write(out_w, b"e" * 10)
    os.close(out_w)
    await capture.done.wait()
    assert reclaimed_on and set(reclaimed_on) == {loop_thread}  # the reclaim ran on the loop, not the thread
    assert lost == [None]  # told once, with no disk error
    assert (log.size, log.lost_bytes, log.lost_placed) == (200, 50, 50)
    assert budget.used == 150 and budget.over
    log.close()
    chunks = [c async for c in log.follow(follow=False)]
    assert b"".join(c.data for c in chunks) == b"k" * 150 and all(c.fd != LOST for c in chunks)


async def test_the_per_job_cap_gives_the_share_back_what_it_drops(tmp_path: Path) -> None:
    budget = Budget(None)
    log = OutputLog(tmp_path / "out", segment_size=64 * 1024, max_bytes=128 * 1024)
    (out_r, out_w), (err_r, err_w) = pipes()
    capture = Capture("capture-test", log, budget, ((out_r, STDOUT), (err_r, STDERR)))
    capture.start()
    os.close(err_w)

    def write_all() -> None:
        for _ in range(16):
            os.write(out_w, b"z" * 64 * 1024)
        os.close(out_w)

    await asyncio.get_running_loop().run_in_executor(None, write_all)
    await capture.done.wait()
    assert log.size == 16 * 64 * 1024 and log.start > 0
    assert budget.used == log.size - log.start  # what was stored minus what the cap dropped
    log.close()


async def test_a_quota_holds_writes_off_as_a_full_disk_does_and_room_again_is_used_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # statvfs shows room under a quota: each write was tried again and made two index records (its run, then the
    # lost one). Here the hold-off lasts the whole test, so only the quota's own answer can end it.
    monkeypatch.setattr("jobsvc.capture.DISK_RETRY", 3600.0)
    over_quota = threading.Event()
    over_quota.set()
    refused_splices = probes = 0

    class QuotaLog(OutputLog):
        def splice_from(self, fd_tag: int, pipe_fd: int, limit: int) -> int:
            nonlocal refused_splices
            if over_quota.is_set():
                refused_splices += 1
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
            return super().splice_from(fd_tag, pipe_fd, limit)

        def room_for(self, n: int) -> bool | None:
            nonlocal probes
            probes += 1
            return not over_quota.is_set() and super().room_for(n)

    log = QuotaLog(tmp_path / "out")
    (out_r, out_w), (err_r, err_w) = pipes()
    lost: list[OSError | None] = []
    capture = Capture("capture-test", log, Budget(None), ((out_r, STDOUT), (err_r, STDERR)), lost.append)
    capture.start()
    os.close(err_w)
    writes = 8
    for i in range(writes):  # one at a time, each taken from the pipe before the next
        os.write(out_w, b"q" * 4096)
        while log.lost_bytes < 4096 * (i + 1):
            await asyncio.sleep(0.002)
    assert refused_splices == 1, "a write under the quota was tried again within the hold-off"
    assert probes <= 2 * writes, "the thread spun on the refused quota"
    over_quota.clear()  # room again, long before the hold-off ends: the next bytes are stored
    follower = log.follow(from_offset=log.size).__aiter__()
    os.write(out_w, b"stored\n")
    assert runs(await read_until(follower, 7)) == [(STDOUT, b"stored\n")]
    os.close(out_w)
    await capture.done.wait()
    assert len(lost) == 1 and lost[0] is not None and lost[0].errno == errno.EDQUOT  # told once
    assert (log.lost_bytes, log.size) == (4096 * writes, 4096 * writes + 7)
    log.close()


# -- the capture threads ---------------------------------------------------------------------------------------


def until(condition: Callable[[], bool]) -> None:
    """Wait for a thread to get there (the test's timeout bounds it)."""
    while not condition():
        time.sleep(0.001)


def test_a_task_goes_to_a_thread_that_was_waiting_for_it() -> None:
    pool = Threads(max_idle=2, idle_timeout=60)
    ran: list[tuple[str, threading.Thread]] = []
    done = threading.Event()

    def task() -> None:
        ran.append((threading.current_thread().name, threading.current_thread()))
        done.set()

    pool.run("capture-one", task)
    done.wait()
    until(lambda: pool.idle == 2)  # the first task's thread and the spare it started
    waiting = set(threading.enumerate())
    done.clear()
    pool.run("capture-two", task)
    done.wait()
    assert [name for name, _ in ran] == ["capture-one", "capture-two"]  # each named for its job while it runs
    assert ran[1][1] in waiting  # no thread was started for the second task
    until(lambda: pool.idle == 2 and pool.live == 2)


def test_a_thread_taking_the_last_idle_slot_starts_a_spare() -> None:
    pool = Threads(max_idle=4, idle_timeout=60)
    release = threading.Event()
    running: list[threading.Thread] = []

    def task() -> None:
        running.append(threading.current_thread())
        release.wait()

    pool.run("capture-a", task)
    until(lambda: pool.idle == 1)  # started by a's thread while a runs
    spare = set(threading.enumerate())
    pool.run("capture-b", task)  # takes the spare, which starts the next
    until(lambda: len(running) == 2 and pool.idle == 1)
    assert running[1] in spare and pool.live == 3
    release.set()
    until(lambda: pool.idle == 3)


def test_tasks_at_once_get_threads_of_their_own_and_only_max_idle_stay() -> None:
    pool = Threads(max_idle=1, idle_timeout=60)
    started: list[threading.Thread] = []
    together, release = threading.Barrier(4), threading.Event()

    def task() -> None:
        started.append(threading.current_thread())
        together.wait()
        release.wait()

    for name in ("capture-a", "capture-b", "capture-c"):
        pool.run(name, task)
    together.wait()  # all three run at once: none waited for another
    assert len(set(started)) == 3
    release.set()
    until(lambda: pool.live == 1 and pool.idle == 1)  # the rest ended
    assert sum(t.is_alive() for t in started) <= 1


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_capture_threads_run_below_the_process_priority_and_spares_do_not_add_up() -> None:
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    pool = Threads(max_idle=4, idle_timeout=60, nice=3)
    seen: list[int] = []
    release = threading.Event()

    def task() -> None:
        seen.append(own_nice())
        release.wait()

    pool.run("capture-a", task)
    until(lambda: pool.idle == 1)  # the spare, started by a's (lowered) thread
    pool.run("capture-b", task)  # on that spare, which starts the next from itself
    until(lambda: len(seen) == 2 and pool.idle == 1)
    pool.run("capture-c", task)
    until(lambda: len(seen) == 3)
    assert seen == [min(19, base + 3)] * 3  # the process's plus 3, however many creators lowered before
    assert own_nice() == base  # the caller (the event loop) keeps its own
    release.set()
    until(lambda: pool.idle == 4)


def test_a_pool_with_no_nice_leaves_its_threads_at_the_process_priority() -> None:
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    seen: list[int] = []
    pool = Threads(max_idle=0, nice=0)
    pool.run("capture-plain", lambda: seen.append(own_nice()))
    until(lambda: bool(seen) and pool.live == 0)
    assert seen == [base]


def test_an_idle_thread_ends_after_its_timeout() -> None:
    pool = Threads(max_idle=4, idle_timeout=0.01)
    threads: list[threading.Thread] = []
    pool.run("capture-short", lambda: threads.append(threading.current_thread()))
    until(lambda: bool(threads))
    threads[0].join()  # it waited for a next task, got none and ended
    until(lambda: pool.live == 0)  # and so did the spare it started
    assert pool.idle == 0


def test_a_thread_that_cannot_start_leaves_the_capture_to_its_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    async def body() -> None:
        log = OutputLog(tmp_path / "out")
        (out_r, out_w), (err_r, err_w) = pipes()
        before = open_fds()
        capture = Capture("capture-test", log, Budget(None), ((out_r, STDOUT), (err_r, STDERR)), threads=Threads())
        monkeypatch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError):
            capture.start()
        monkeypatch.undo()
        assert open_fds() == before  # its eventfd is closed; the pipes are open
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)  # the pipes are still the caller's
        log.close()

    asyncio.run(body())
