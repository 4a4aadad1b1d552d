"""OutputLog: one writer, many readers, by offset, through real files in tmp_path."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobsvc.output import MAX_CHUNK, MIN_CHUNK, STDERR, STDOUT, Chunk, OutputLog, chunk_size_for


async def collect(log: OutputLog, from_offset: int = 0) -> list[Chunk]:
    return [c async for c in log.follow(from_offset)]


def joined(chunks: list[Chunk], fd: int | None = None) -> bytes:
    return b"".join(c.data for c in chunks if fd is None or c.fd == fd)


async def test_hundred_concurrent_readers_get_identical_bytes(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", segment_size=1 << 20)  # small segments: reads cross many boundaries
    readers = [asyncio.create_task(collect(log)) for _ in range(100)]
    digest = hashlib.sha256()
    for i in range(200):
        data = os.urandom(7919 + i)
        digest.update(data)
        log.append(STDOUT, data)
        log.notify()
        if i % 10 == 0:
            await asyncio.sleep(0)  # let readers catch up mid-stream and wait live
    log.close()
    results = await asyncio.gather(*readers)
    for chunks in results:
        assert hashlib.sha256(joined(chunks)).hexdigest() == digest.hexdigest()
        offsets = [c.offset for c in chunks]
        assert offsets == sorted(offsets)
        assert all(len(c.data) <= MAX_CHUNK for c in chunks)


async def test_chunks_carry_their_offsets_and_streams(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", segment_size=64)
    log.append(STDOUT, b"a" * 100)
    log.append(STDERR, b"b" * 30)
    log.append(STDERR, b"c" * 5)
    log.append(STDOUT, b"d" * 70)
    log.close()
    chunks = await collect(log)
    assert joined(chunks, STDOUT) == b"a" * 100 + b"d" * 70
    assert joined(chunks, STDERR) == b"b" * 30 + b"c" * 5
    pos = 0
    for c in chunks:
        assert c.offset == pos
        pos += len(c.data)
    assert pos == 205 == log.size


@pytest.mark.parametrize("offset", [0, 1, 63, 64, 99, 100, 129, 130, 205])
async def test_reader_from_an_offset_gets_exactly_the_rest(tmp_path: Path, offset: int) -> None:
    log = OutputLog(tmp_path / "out", segment_size=64)
    data = bytes(range(256)) * 2
    log.append(STDOUT, data[:100])
    log.append(STDERR, data[100:130])
    log.append(STDOUT, data[130:205])
    log.close()
    chunks = await collect(log, offset)
    assert joined(chunks) == data[offset:205]
    if chunks:
        assert chunks[0].offset == offset
    stderr_part = joined(chunks, STDERR)
    assert stderr_part == data[max(offset, 100) : 130] if offset < 130 else stderr_part == b""


async def test_reader_started_after_close_gets_everything(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out")
    log.append(STDOUT, b"hello ")
    log.append(STDOUT, b"world")
    log.notify()
    log.close()
    assert joined(await collect(log)) == b"hello world"


async def test_live_reader_is_woken_by_notify_without_polling(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out")
    it = log.follow(0).__aiter__()
    pending = asyncio.ensure_future(it.__anext__())
    await asyncio.sleep(0.05)
    assert not pending.done()  # nothing written: the reader waits
    before = time.time()
    log.append(STDOUT, b"x")
    await asyncio.sleep(0.05)
    assert not pending.done()  # written but not yet announced
    log.notify()
    chunk = await asyncio.wait_for(pending, 1)
    assert (chunk.offset, chunk.fd, chunk.data) == (0, STDOUT, b"x")
    assert int(before * 1000) <= chunk.read_at_ms <= time.time() * 1000  # when the server read it
    log.close()
    with pytest.raises(StopAsyncIteration):
        await it.__anext__()


async def test_stalled_reader_does_not_slow_the_writer_or_other_readers(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", segment_size=1 << 20)
    stalled = log.follow(0).__aiter__()
    first = await asyncio.wait_for(asyncio.ensure_future(_first_after_write(log, stalled)), 1)
    assert first.offset == 0
    # The stalled reader now holds an offset and never reads again; the writer goes on.
    block = os.urandom(64 * 1024)
    fast = asyncio.create_task(collect(log))
    for i in range(256):  # 16 MiB, letting the fast reader run between appends
        log.append(STDOUT, block)
        log.notify()
        if i % 16 == 0:
            await asyncio.sleep(0)
    log.close()
    fast_chunks = await asyncio.wait_for(fast, 30)
    assert sum(len(c.data) for c in fast_chunks) == log.size == 256 * len(block) + 1
    # The stalled reader held nothing but its offset; when it wakes it resumes exactly where it stopped.
    rest = [c async for c in stalled]
    assert rest[0].offset == 1
    assert b"".join(c.data for c in rest) == block * 256


async def _first_after_write(log: OutputLog, it: object) -> Chunk:
    log.append(STDOUT, b"!")
    log.notify()
    return await it.__anext__()  # type: ignore[attr-defined, no-any-return]


async def test_cancelling_one_waiting_reader_leaves_the_others_waiting(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out")
    a = asyncio.create_task(collect(log))
    b = asyncio.create_task(collect(log))
    await asyncio.sleep(0.01)
    a.cancel()
    await asyncio.sleep(0.01)
    log.append(STDOUT, b"still here")
    log.notify()
    log.close()
    assert joined(await asyncio.wait_for(b, 1)) == b"still here"
    with pytest.raises(asyncio.CancelledError):
        await a


async def test_splice_from_a_pipe(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", segment_size=1000)
    r, w = os.pipe()
    os.set_blocking(r, False)
    payload = os.urandom(2500)
    os.write(w, payload)
    os.close(w)
    total = 0
    while True:
        n = log.splice_from(STDERR, r, 4096)
        if n == 0:
            break
        total += n
    os.close(r)
    log.close()
    chunks = await collect(log)
    assert total == 2500
    assert joined(chunks, STDERR) == payload
    assert sorted(p.name for p in (tmp_path / "out").glob("*.seg")) == [
        "000000000000.seg",
        "000000000001.seg",
        "000000000002.seg",
    ]


async def test_a_job_that_writes_nothing_leaves_no_files(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out")
    r, w = os.pipe()
    os.set_blocking(r, False)
    with pytest.raises(BlockingIOError):  # nothing yet, the writer still open
        log.splice_from(STDOUT, r, 4096)
    os.close(w)
    assert log.splice_from(STDOUT, r, 4096) == 0  # the end, and still no file made for it
    os.close(r)
    log.end_writes()
    log.close()
    assert not (tmp_path / "out").exists()
    assert await collect(log) == []
    again = OutputLog.recover(tmp_path / "out")
    assert (again.start, again.size, again.closed) == (0, 0, True) and await collect(again) == []


async def test_segment_size_is_on_disk_only_when_it_is_not_the_formats(tmp_path: Path) -> None:
    for name, size in (("default", None), ("small", 4096)):
        log = OutputLog(tmp_path / name) if size is None else OutputLog(tmp_path / name, segment_size=size)
        log.append(STDOUT, b"x" * 5000)
        log.notify()
        log.close()
        assert (tmp_path / name / "segment-size").exists() == (size is not None)
        again = OutputLog.recover(tmp_path / name)
        assert again.size == 5000 and joined(await collect(again)) == b"x" * 5000


async def test_retention_drops_whole_old_segments_and_a_keeping_up_reader_misses_nothing(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", segment_size=1024, max_bytes=4096)
    reader = log.follow(0).__aiter__()
    received = bytearray()
    expected = bytearray()
    for i in range(40):
        data = bytes([i]) * 500
        expected += data
        log.append(STDOUT if i % 3 else STDERR, data)
        log.notify()
        while len(received) < len(expected):  # this reader keeps up
            chunk = await reader.__anext__()
            assert chunk.offset == len(received)  # no gap, no repeat across rotations
            received += chunk.data
    assert received == expected
    assert log.size - log.start <= 4096 and log.start > 0 and log.start % 1024 == 0
    assert len(list((tmp_path / "out").glob("*.seg"))) <= 5
    log.close()
    await reader.aclose()  # type: ignore[attr-defined]  # follow() is an async generator


async def test_a_reader_behind_the_window_is_told_by_the_offsets(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", segment_size=1024, max_bytes=2048)
    data = os.urandom(10_000)
    log.append(STDOUT, data)
    log.notify()
    log.close()
    chunks = await collect(log, 0)
    assert chunks[0].offset == log.start > 0  # the first byte still retained, and how many were dropped
    assert joined(chunks) == data[log.start :]
    later = await collect(log, log.start + 10)
    assert joined(later) == data[log.start + 10 :]


async def test_recover_reads_a_log_back_after_a_crash(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", segment_size=4096, max_bytes=8192)
    parts = [(STDOUT, os.urandom(3000)), (STDERR, os.urandom(5000)), (STDOUT, os.urandom(9000))]
    for fd, data in parts:
        log.append(fd, data)
        log.notify()
    start, size = log.start, log.size
    # no close(): the writer died; a torn half record at the end of the index is ignored
    with open(tmp_path / "out" / "index", "ab") as index:
        index.write(b"\x01\x02\x03")
    again = OutputLog.recover(tmp_path / "out")
    assert (again.start, again.size, again.closed) == (start, size, True)
    chunks = await collect(again)
    everything = b"".join(d for _, d in parts)
    assert joined(chunks) == everything[start:]
    assert start == 12288  # 17000 bytes, at most 8192 retained, in whole 4096-byte segments
    assert joined(chunks, STDERR) == b""  # the stderr run [3000, 8000) was dropped
    assert joined(chunks, STDOUT) == parts[2][1][start - 8000 :]
    mid = OutputLog(tmp_path / "mid", segment_size=4096)
    for fd, data in parts:
        mid.append(fd, data)
    back = await collect(OutputLog.recover(tmp_path / "mid"))
    assert joined(back, STDERR) == parts[1][1]
    assert joined(back, STDOUT) == parts[0][1] + parts[2][1]


async def test_no_follow_only_and_tail(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", segment_size=16)  # tiny segments: scans cross boundaries
    log.append(STDOUT, b"o1\no2\n")
    log.append(STDERR, b"e1\n")
    log.append(STDOUT, b"o3\no4")
    log.notify()
    # no_follow: what exists now, even though the job goes on
    assert joined([c async for c in log.follow(0, follow=False)]) == b"o1\no2\ne1\no3\no4"
    assert joined([c async for c in log.follow(0, follow=False, only=STDERR)]) == b"e1\n"
    assert joined([c async for c in log.follow(0, follow=False, only=STDOUT)]) == b"o1\no2\no3\no4"
    assert log.tail_offset(1) == log.size - 2  # "o4" (no final newline) is the last line
    assert log.tail_offset(2) == log.size - 5
    assert log.tail_offset(3) == 6  # e1, o3, o4: "e1" starts after "o1\no2\n"
    assert log.tail_offset(100) == 0
    assert log.tail_offset(0) == log.size
    tail_err = log.tail_offset(1, only=STDERR)
    assert joined([c async for c in log.follow(tail_err, follow=False, only=STDERR)]) == b"e1\n"
    tail2 = log.tail_offset(2, only=STDOUT)
    assert joined([c async for c in log.follow(tail2, follow=False, only=STDOUT)]) == b"o3\no4"
    log.append(STDOUT, b"\n")
    log.close()
    assert joined([c async for c in log.follow(log.tail_offset(1), only=STDOUT)]) == b"o4\n"


def test_message_size_shrinks_as_streams_multiply() -> None:
    assert chunk_size_for(0) == chunk_size_for(1) == chunk_size_for(10) == MAX_CHUNK
    sizes = [chunk_size_for(n) for n in (1, 10, 32, 33, 100, 1000, 100_000)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == MIN_CHUNK
    assert chunk_size_for(1000) * 1000 <= 32 << 20  # a thousand streams hold tens of MiB, not a gigabyte


async def test_a_reader_asks_for_its_chunk_size_before_each_read(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out")
    log.append(STDOUT, bytes(range(256)) * 100)
    log.notify()
    log.close()
    sizes = iter([1000, 7, 100_000])
    chunks = [c async for c in log.follow(chunk_size=lambda: next(sizes))]
    assert [len(c.data) for c in chunks] == [1000, 7, 25_600 - 1007]  # the last read is what is left
    assert joined(chunks) == bytes(range(256)) * 100


def _writes_then_crash(directory: Path, crash_after: int) -> None:
    """In a child: alternate stdout and stderr appends, and die like kill -9 right after the crash_after-th
    write syscall (index or data)."""
    calls = 0
    real_write, real_pwrite = os.write, os.pwrite

    def counted(real: Callable[..., int]) -> Callable[..., int]:
        def call(*args: Any) -> int:
            nonlocal calls
            result = real(*args)
            calls += 1
            if calls == crash_after:
                os._exit(0)
            return result

        return call

    os.write = counted(real_write)  # the os module jobsvc.output writes through
    os.pwrite = counted(real_pwrite)
    log = OutputLog(directory, segment_size=1 << 16)
    for i in range(12):
        log.append(STDOUT if i % 2 == 0 else STDERR, (b"o" if i % 2 == 0 else b"e") * (3000 + i))
    os._exit(0)


@pytest.mark.parametrize("crash_after", range(1, 30))
async def test_a_crash_between_any_two_writes_never_mislabels_a_byte(tmp_path: Path, crash_after: int) -> None:
    # Each byte says which stream it came from (o or e): after a crash at any point, every byte read back is
    # under its own stream, whatever was cut off.
    directory = tmp_path / "out"
    pid = os.fork()
    if pid == 0:
        _writes_then_crash(directory, crash_after)
    os.waitpid(pid, 0)
    log = OutputLog.recover(directory)
    chunks = await collect(log)
    assert b"o" not in joined(chunks, STDERR) and b"e" not in joined(chunks, STDOUT)
    assert sum(len(c.data) for c in chunks) <= log.size


async def test_lost_output_is_a_gap_readers_see_where_it_is(tmp_path: Path) -> None:
    from jobsvc.output import LOST

    log = OutputLog(tmp_path / "out", segment_size=1 << 16)
    log.append(STDOUT, b"before\n")
    assert log.skip_lost(3 << 16)  # more than two whole segments never written
    log.append(STDERR, b"after\n")
    log.notify()
    assert log.lost_bytes == 3 << 16 and log.size == 7 + (3 << 16) + 6
    chunks = [c async for c in log.follow(follow=False)]
    assert [(c.offset, c.fd, c.data) for c in chunks] == [(0, STDOUT, b"before\n"), (7 + (3 << 16), STDERR, b"after\n")]
    assert all(c.fd != LOST for c in chunks)
    last_line = log.tail_offset(1)  # the gap holds no bytes, so no lines either
    assert [c.data async for c in log.follow(last_line, follow=False)] == [b"after\n"]
    log.close()
    # after a restart the gap is still where it was, and the segments on either side of it are kept
    again = OutputLog.recover(tmp_path / "out")
    assert (again.start, again.size) == (0, log.size)
    assert [(c.offset, c.data) for c in await collect(again)] == [(0, b"before\n"), (7 + (3 << 16), b"after\n")]


def test_recover_a_log_whose_first_index_record_never_reached_the_disk(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "out", segment_size=4096)
    # what a full disk leaves: the segment file was made, its run's index record was refused
    assert log.room_for(1) is not False
    log.end_writes()
    assert (tmp_path / "out" / f"{0:012d}.seg").exists() and not (tmp_path / "out" / "index").exists()
    again = OutputLog.recover(tmp_path / "out")
    assert (again.start, again.size, again.closed) == (0, 0, True)


async def test_bytes_with_no_run_record_are_counted_lost_not_shown_under_a_guessed_stream(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    log = OutputLog(directory, segment_size=1 << 16)
    log.append(STDERR, b"which stream was this?")
    log.close()
    (directory / "index").unlink()  # as a log written before runs were declared first could be left by a crash
    again = OutputLog.recover(directory)
    assert await collect(again) == []
    assert again.lost_bytes == again.size == len(b"which stream was this?")


async def test_runs_carry_the_time_they_were_read_and_since_finds_the_first_byte_after_a_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    now = [1_000_000.0]
    monkeypatch.setattr("jobsvc.output.time.time", lambda: now[0])
    log = OutputLog(tmp_path / "out", segment_size=1 << 16)
    log.append(STDOUT, b"a1\n")
    now[0] += 0.05
    log.append(STDOUT, b"a2\n")  # within the same 0.1 s run: same timestamp
    now[0] += 5
    log.append(STDOUT, b"b\n")  # a new run, 5 s later
    now[0] += 0.01
    log.append(STDERR, b"c\n")  # another stream: a new run whatever the time
    now[0] -= 60  # the clock steps back: runs keep their order in time
    log.append(STDERR, b"d\n")
    log.close()
    chunks = await collect(log)
    assert [(c.data, c.read_at_ms) for c in chunks] == [
        (b"a1\na2\n", 1_000_000_000),
        (b"b\n", 1_000_005_050),
        (b"c\nd\n", 1_000_005_060),  # d's clock said a minute earlier: it stays in c's run, never before it
    ]
    assert log.offset_since(0) == 0
    assert log.offset_since(1_000_000_001) == 6  # the first byte read after that moment: "b"
    assert log.offset_since(1_000_005_060) == 8
    assert log.offset_since(2_000_000_000) == log.size  # nothing yet: a follower waits for new output
    again = OutputLog.recover(tmp_path / "out")  # the times are on disk
    assert [c.read_at_ms for c in await collect(again)] == [c.read_at_ms for c in chunks]


async def test_an_ended_log_reads_the_disk_only_when_a_reader_comes(tmp_path: Path) -> None:
    directory = tmp_path / "out"
    log = OutputLog(directory, segment_size=1 << 16)
    log.append(STDOUT, b"one\n" * 20000)  # more than a segment
    log.append(STDERR, b"two\n")
    log.close()
    (directory / "index").rename(directory / "index.kept")  # were it read now, this would show
    ended = OutputLog.ended(directory, log.size, 0, 3)
    assert (ended.size, ended.start, ended.lost_bytes) == (log.size, 0, 3)  # from the record, no disk read
    (directory / "index.kept").rename(directory / "index")
    assert ended.tail_offset(1) == log.size - 4
    chunks = await collect(ended)
    assert joined(chunks, STDOUT) == b"one\n" * 20000 and joined(chunks, STDERR) == b"two\n"
    assert ended.lost_bytes == 3


async def test_room_asked_for_is_allocated_where_the_next_bytes_go_and_given_back_when_writes_end(
    tmp_path: Path,
) -> None:
    log = OutputLog(tmp_path / "out", segment_size=1 << 20)
    log.append(STDOUT, b"x" * 10)
    segment = tmp_path / "out" / f"{0:012d}.seg"
    before = segment.stat().st_blocks
    assert log.room_for(512 * 1024) is True
    assert segment.stat().st_size == 10  # readers see nothing of it
    assert (segment.stat().st_blocks - before) * 512 >= 512 * 1024  # the blocks are held for the next writes
    log.append(STDOUT, b"y" * 20)
    log.end_writes()
    assert segment.stat().st_blocks <= max(before, 8)  # what was left past the end is given back
    log.notify()
    log.close()
    assert joined(await collect(log)) == b"x" * 10 + b"y" * 20
