"""OutputLog: a job's output on disk, append-only, one writer and any number of readers by byte offset.

Layout of a log directory:
  <segment number>.seg  raw output bytes; segment k holds global offsets [k * S, (k + 1) * S)
  index                 16-byte records (offset of a run's first byte, fd, when it was read: Unix ms in 7 bytes),
                        one per change of stream and at least every RUN_SPAN_MS of output
  segment-size          the segment size S if it is not SEGMENT_SIZE, so a restarted server can read the log back
The directory and its files are made when the first byte (or lost run) comes: a job that writes nothing costs no
inode here (each is a scan on ext4 without a journal, see jobsvc/workroot.py).
The bytes live in the page cache, not in the server: readers hold only an offset (memory does not grow with output),
and the writer never waits for a reader. Retention can drop whole old segments without touching live ones.

A run's index record is written before its first byte: a process crash between the two leaves an empty run, never
bytes under the previous run's stream (nothing is fsync'd: a kernel crash or power loss promises nothing here).
Output that could not be stored (the disk was full) is a LOST run: its offsets
are used but hold no bytes, so readers skip them and see the jump.

The writer (a job's capture thread, jobsvc/capture.py, or the caller itself) and the readers (the event loop) keep
figures of their own: the writer's (_w_*: where it writes next, its runs) change as it writes, under the log's
lock, and notify() copies them, under the same lock, to the ones readers, retention and Get use (size, the runs,
lost bytes). So readers see only bytes that are in the segment files already, the lock is never held across a
write that may block, and the writer alone touches the segment it writes (retention keeps the segment holding
the readers' end, which the writer's end is never behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from jobsvc import disk

STDOUT = 1
STDERR = 2
LOST = 3  # a run of offsets whose bytes could not be stored
MAX_CHUNK = 1024 * 1024  # the largest Stream message (clients accept 4 MiB)
MIN_CHUNK = 32 * 1024
STREAM_BUFFER_BUDGET = 32 * 1024 * 1024  # chunks in flight across all streams, roughly (see chunk_size_for)
SEGMENT_SIZE = 64 * 1024 * 1024  # the format's: a log without a segment-size file has it (never change it)
_RUN = struct.Struct("<QB7s")  # a record of a log from before timestamps has zeros there: time not known
INDEX_RESERVE = 4096 * 16
RUN_SPAN_MS = 100  # a new run (and so a new timestamp) once the current one is this old: time to 0.1 s
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def chunk_size_for(streams: int) -> int:
    """The largest Stream message while `streams` are open: 1 MiB for a few, halved until they fit the budget.

    Each open stream holds about two of its messages in the server (the one being sent, the one gRPC is
    writing), so at 1,000 clients 256 KiB messages meant 0.7-1.2 GB of RSS; large messages only pay off when few
    clients share the cores (per-message costs dominate there).
    """
    size = MAX_CHUNK
    while size > MIN_CHUNK and size * streams > STREAM_BUFFER_BUDGET:
        size //= 2
    return size


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int  # global offset of data[0] in the job's output
    fd: int  # STDOUT or STDERR
    data: bytes
    read_at_ms: int = 0  # when the server read data[0] from the job, Unix time in ms, to RUN_SPAN_MS (0: unknown)


def _pack(start: int, fd: int, ms: int) -> bytes:
    return _RUN.pack(start, fd, ms.to_bytes(7, "little"))


def _unpack(buf: bytes, at: int = 0) -> tuple[int, int, int]:
    start, fd, ms = _RUN.unpack_from(buf, at)
    return start, fd, int.from_bytes(ms, "little")


def _lost_spans(runs: list[tuple[int, int, int]], size: int) -> list[tuple[int, int]]:
    if not runs:  # no index record reached the disk (a full disk): nothing is recorded as lost
        return []
    ends = [run[0] for run in runs[1:]] + [size]
    return [(start, end) for (start, fd, _), end in zip(runs, ends, strict=True) if fd == LOST]


def _covered(spans: list[tuple[int, int]], a: int, b: int) -> bool:
    return a >= 0 and any(start <= a and b <= end for start, end in spans)


class _NoWriter:
    """The lock of a log nobody writes to (an ended job's): one object for all of them."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_WRITER = _NoWriter()


def _events_now(fd: int) -> int:
    """fd's poll events now, without waiting (0: none)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ready = poller.poll(0)
    return ready[0][1] if ready else 0


def segment_size_for(max_bytes: int | None) -> int:
    """Segments small enough that retention drops at most an eighth of a capped log at a time."""
    if max_bytes is None:
        return SEGMENT_SIZE
    return max(64 * 1024, min(SEGMENT_SIZE, (max_bytes // 8) // 4096 * 4096))


class OutputLog:
    """A job's output; write with append()/splice_from() then notify(); read with follow().

    With max_bytes set, the oldest whole segments are dropped once more than max_bytes are retained: the job is
    never blocked, and readers that fall behind skip to the oldest retained byte (the chunk offsets show the gap).
    """

    # One per kept job (50,000 after a long run): slots, and the directory kept as the str it came as
    __slots__ = (
        "_capturing",
        "_closed",
        "_dirname",
        "_fresh",
        "_index_fd",
        "_last_fd",
        "_last_run_ms",
        "_last_run_start",
        "_lock",
        "_made",
        "_max_bytes",
        "_read_fds",
        "_readers",
        "_runs",
        "_seg_size",
        "_size",
        "_start",
        "_unread",
        "_w_last",
        "_w_lost",
        "_w_lost_placed",
        "_w_reserved",
        "_w_runs",
        "_w_size",
        "_waiter",
        "_wfd",
        "_wseg",
        "lost_bytes",
        "lost_placed",
    )

    def __init__(
        self,
        directory: Path | str,
        segment_size: int = SEGMENT_SIZE,
        max_bytes: int | None = None,
        create: bool = True,
    ) -> None:
        self._dirname = os.fspath(directory)
        self._made = not create  # a log read back is where it is; a new one is made with its first file
        self._seg_size = segment_size
        self._max_bytes = max_bytes
        self._index_fd = -1
        # what readers see (the event loop's): changed by notify() and by reading a log back
        self._size = 0
        self._start = 0  # oldest retained byte
        self._runs = 0
        self._last_run_start = 0
        self._last_fd = 0
        self._last_run_ms = 0
        self.lost_bytes = 0
        self.lost_placed = 0  # the lost bytes that took offsets (LOST runs): they hold nothing on disk
        # the writer's: its thread changes them under the lock; notify() copies them to the above under it
        self._lock = threading.Lock() if create else _NO_WRITER
        self._w_size = 0
        self._w_runs = 0
        self._w_last = (0, 0, 0)  # (start, fd, read_at_ms) of the writer's newest run
        self._w_lost = 0
        self._w_lost_placed = 0
        self._w_reserved = False  # room_for() allocated blocks past the segment's end (given back by end_writes)
        self._fresh = False  # the writer's figures changed since notify() last copied them
        self._wseg = -1
        self._wfd = -1
        self._capturing = False  # a capture thread writes (its files stay open until it has ended)
        self._read_fds: dict[int, int] = {}
        self._readers = 0
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._unread = False  # an ended job's log not read back from disk yet (see ended())

    @property
    def _dir(self) -> Path:
        return Path(self._dirname)

    @property
    def directory(self) -> str:
        return self._dirname

    @property
    def size(self) -> int:
        return self._size

    @property
    def start(self) -> int:
        return self._start

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def wanted(self) -> bool:
        """A reader is waiting for new output (read from the writer's thread: a hint, so no lock)."""
        return self._waiter is not None

    @classmethod
    def recover(cls, directory: Path | str) -> OutputLog:
        """A closed log read back from disk after a restart or crash (a torn last index record is ignored)."""
        log = cls(directory, create=False)
        log._read_back()
        return log

    @classmethod
    def ended(cls, directory: Path | str, size: int, start: int, lost: int) -> OutputLog:
        """An ended job's log as its final record describes it; the disk is read only when a reader comes.

        A restart with 50,000 kept jobs read every index and globbed every segment directory for logs that are
        mostly never streamed again.
        """
        log = cls(directory, create=False)
        log._size, log._start, log.lost_bytes = size, start, lost
        log.lost_placed = min(lost, size - start)  # as near as the record tells
        log._closed = True
        log._unread = True
        return log

    def _ensure_read(self) -> None:
        if self._unread:
            self._unread = False
            lost = self.lost_bytes
            self._read_back()
            self.lost_bytes = max(self.lost_bytes, lost)

    def _read_back(self) -> None:
        directory = self._dir
        try:
            seg_size = int((directory / "segment-size").read_text())
        except (OSError, ValueError):
            seg_size = SEGMENT_SIZE
        self._seg_size = seg_size
        self._size = self._start = 0
        try:
            index = (directory / "index").read_bytes()
        except OSError:
            index = b""
        runs = [_unpack(index, i) for i in range(0, len(index) - _RUN.size + 1, _RUN.size)]
        numbers = sorted(int(p.stem) for p in directory.glob("*.seg") if p.stem.isdigit())
        if numbers:
            self._size = numbers[-1] * seg_size + self._segment_path(numbers[-1]).stat().st_size
            # keep the newest contiguous run of segments (older ones were dropped by retention); a segment that
            # was never written because all of it was lost does not break the run
            lost = _lost_spans(runs, self._size)
            first = numbers[-1]
            while first - 1 in numbers or _covered(lost, (first - 1) * seg_size, first * seg_size):
                first -= 1
            while first not in numbers:  # the oldest kept segment is one that holds bytes
                first += 1
            self._start = first * seg_size
        runs = [run for run in runs if run[0] <= self._size]
        if not runs and self._size:
            # bytes with no run record (a log written before runs were declared first): which stream they came
            # from is unknown, so they count as lost rather than be shown under a guessed one
            runs = [(0, LOST, 0)]
            os.write(self._index(), _pack(0, LOST, 0))
            self.lost_bytes = self._size - self._start
        self._runs = len(runs)
        if runs:
            self._last_run_start, self._last_fd, self._last_run_ms = runs[-1]
        self._closed = True

    # -- writer (one thread at a time: a capture thread, or the caller) ------------------------------------------------

    def _segment_path(self, k: int) -> Path:
        return self._dir / f"{k:012d}.seg"

    def _make(self) -> None:
        """The log's directory, before its first file (the writer's, once)."""
        if not self._made:
            self._dir.mkdir(parents=True, exist_ok=True)
            if self._seg_size != SEGMENT_SIZE:
                (self._dir / "segment-size").write_text(f"{self._seg_size}\n")
            self._made = True

    def _write_target(self) -> tuple[int, int, int]:
        """(fd, position in segment, room left) for the next byte."""
        k, pos = divmod(self._w_size, self._seg_size)
        if k != self._wseg:
            if self._wfd >= 0:
                os.close(self._wfd)
            self._make()
            self._wfd = os.open(self._segment_path(k), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._wseg = k
        return self._wfd, pos, self._seg_size - pos

    def _index(self) -> int:
        # Opened on demand and closed with the log, so thousands of ended jobs hold no descriptors.
        if self._index_fd < 0:
            self._make()
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            self._index_fd = os.open(self._dir / "index", flags, 0o600)
            if not self._closed:
                # room for 4,096 runs ahead (about 7 min of output at a run per 0.1 s, more when quieter), so
                # that a full disk cannot refuse the record of where output was lost
                with contextlib.suppress(OSError):
                    disk.reserve(self._index_fd, 0, INDEX_RESERVE)
        return self._index_fd

    def _declare(self, fd_tag: int) -> None:
        """Start a run of fd_tag at the current end, on disk before any of its bytes (crash consistency), when the
        stream changes or the current run is RUN_SPAN_MS old (one timestamp per run keeps the cost at a record)."""
        now = int(time.time() * 1000)
        _, last_fd, last_ms = self._w_last
        if fd_tag != last_fd or now - last_ms >= RUN_SPAN_MS:
            ms = max(now, last_ms)  # never backwards (a clock step): runs stay ordered by time too
            os.write(self._index(), _pack(self._w_size, fd_tag, ms))
            with self._lock:
                self._w_runs += 1
                self._w_last = (self._w_size, fd_tag, ms)
                self._fresh = True

    def _grow(self, n: int, lost: int = 0) -> None:
        with self._lock:
            self._w_size += n
            self._w_lost_placed += lost
            self._fresh = True

    def append(self, fd_tag: int, data: bytes) -> None:
        """Append bytes read from stream fd_tag (call notify() once after a batch)."""
        view = memoryview(data)
        self._declare(fd_tag)
        while view:
            wfd, pos, room = self._write_target()
            n = os.pwrite(wfd, view[:room], pos)
            self._grow(n)
            view = view[n:]

    def splice_from(self, fd_tag: int, pipe_fd: int, limit: int) -> int:
        """Move up to limit bytes from a non-blocking pipe into the log without copying through Python.

        Returns 0 at EOF; raises BlockingIOError when the pipe is empty. Until the first byte, the pipe is looked at
        first: a job that writes nothing leaves no files.
        """
        if self._wfd < 0:
            events = _events_now(pipe_fd)
            if not events & (select.POLLIN | select.POLLNVAL):  # POLLNVAL: the splice below says what is wrong
                if events & (select.POLLHUP | select.POLLERR):
                    return 0
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        wfd, pos, room = self._write_target()
        self._declare(fd_tag)
        n = os.splice(pipe_fd, wfd, min(limit, room), offset_dst=pos, flags=_SPLICE_FLAGS)
        self._grow(n)
        return n

    def skip_lost(self, n: int) -> bool:
        """Mark the next n offsets as lost (their bytes could not be stored); False if even that could not be
        recorded (then only lost_bytes counts them)."""
        with self._lock:
            self._w_lost += n
            self._fresh = True
        try:
            self._declare(LOST)
        except OSError:
            return False
        self._grow(n, lost=n)
        return True

    def room_for(self, n: int) -> bool | None:
        """Whether the next n bytes (to the segment's end) can be stored: the blocks are allocated where they go, so
        a quota (EDQUOT, which statvfs does not see) answers as a full disk does; None when it cannot be told.

        Blocks allocated are the next writes' own (they cannot be refused then); what is left past the end when
        the writer is done is given back by end_writes()."""
        wfd, pos, room = self._write_target()
        try:
            disk.reserve(wfd, pos, min(n, room))
        except OSError as e:
            return False if e.errno in (errno.ENOSPC, errno.EDQUOT) else None
        self._w_reserved = True
        return True

    def end_writes(self) -> None:
        """The writer is done: its segment file is closed (the writer's thread calls this last)."""
        if self._wfd >= 0:
            if self._w_reserved:  # room_for()'s blocks past the end are not needed any more
                with contextlib.suppress(OSError):
                    os.ftruncate(self._wfd, os.fstat(self._wfd).st_size)
            os.close(self._wfd)
            self._wfd = -1

    def capture_started(self) -> None:
        """A capture thread is the writer from now on (on the loop, before it starts)."""
        self._capturing = True

    def capture_ended(self) -> None:
        """The capture thread has ended (on the loop, after its end_writes()): the files may close."""
        self._capturing = False
        if self._closed and self._readers == 0:
            self._close_files()

    # -- the readers' side (the event loop) ---------------------------------------------------------------------------

    def _publish(self) -> None:
        """Make what the writer has written visible to readers, retention and Get."""
        if not self._fresh:  # unlocked: the writer asks for another notify() after each change
            return
        with self._lock:
            self._fresh = False
            self._size, self._runs = self._w_size, self._w_runs
            self._last_run_start, self._last_fd, self._last_run_ms = self._w_last
            self.lost_bytes, self.lost_placed = self._w_lost, self._w_lost_placed

    def notify(self) -> None:
        """Show readers what was written and wake every waiting one (once per batch of appends, not per chunk),
        after applying retention."""
        self._publish()
        if self._max_bytes is not None and self._size - self._start > self._max_bytes:
            self._drop_to(self._size - self._max_bytes)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _drop_to(self, offset: int) -> None:
        """Delete whole segments so that the oldest retained byte is at or after offset (never the live one)."""
        first_kept = min(-(-offset // self._seg_size), self._size // self._seg_size)
        for k in range(self._start // self._seg_size, first_kept):
            fd = self._read_fds.pop(k, None)
            if fd is not None:
                os.close(fd)
            self._segment_path(k).unlink(missing_ok=True)
        self._start = max(self._start, first_kept * self._seg_size)

    def drop_oldest_segment(self) -> int:
        """Free the oldest segment (a state-dir-wide cap); the bytes dropped."""
        if self._size // self._seg_size <= self._start // self._seg_size:
            return 0
        before = self._start
        self._drop_to(self._start + 1)
        return self._start - before

    def close(self) -> None:
        """No more output: readers end after the last byte (a capture thread still writing closes its own file)."""
        self._closed = True
        if not self._capturing:
            self.end_writes()
        self.notify()
        if self._readers == 0:
            self._close_files()

    def _run_entry(self, i: int) -> tuple[int, int, int]:
        """(start, fd, read_at_ms) of run i."""
        if i == self._runs - 1:
            return self._last_run_start, self._last_fd, self._last_run_ms
        return _unpack(os.pread(self._index(), _RUN.size, i * _RUN.size))

    def _run_at(self, pos: int) -> tuple[int, int, int]:
        """(fd, end offset, read_at_ms) of the run holding pos (end is the log size for the last run)."""
        lo, hi = 0, self._runs - 1
        while lo < hi:  # the last run starting at or before pos
            mid = (lo + hi + 1) // 2
            if self._run_entry(mid)[0] <= pos:
                lo = mid
            else:
                hi = mid - 1
        _, fd, ms = self._run_entry(lo)
        end = self._run_entry(lo + 1)[0] if lo + 1 < self._runs else self._size
        return fd, end, ms

    def offset_since(self, ms: int) -> int:
        """Where the first byte read at or after ms (Unix time in ms) begins; the end when there is none yet."""
        self._ensure_read()
        lo, hi = 0, self._runs  # the first run whose time is >= ms (runs are ordered by time)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._run_entry(mid)[2] < ms:
                lo = mid + 1
            else:
                hi = mid
        return max(self._run_entry(lo)[0], self._start) if lo < self._runs else self._size

    def _read_fd(self, k: int) -> int:
        fd = self._read_fds.get(k)
        if fd is None:
            fd = os.open(self._segment_path(k), os.O_RDONLY | os.O_CLOEXEC)
            self._read_fds[k] = fd
        return fd

    def _close_files(self) -> None:
        if self._capturing:  # the capture thread writes the index; capture_ended() closes them
            return
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        if self._index_fd >= 0:
            with contextlib.suppress(OSError):  # the room reserved past its end is not needed any more
                os.ftruncate(self._index_fd, os.fstat(self._index_fd).st_size)
            os.close(self._index_fd)
            self._index_fd = -1

    async def _wait(self) -> None:
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        # shield: one reader's cancellation must not cancel the future every reader shares
        await asyncio.shield(self._waiter)

    async def follow(
        self,
        from_offset: int = 0,
        follow: bool = True,
        only: int | None = None,
        chunk_size: Callable[[], int] = lambda: MAX_CHUNK,
    ) -> AsyncIterator[Chunk]:
        """Everything from from_offset (or the oldest retained byte), then live output until the log closes.

        follow=False ends at the output that exists now; only=STDOUT or STDERR skips the other stream;
        chunk_size() is asked before each read for the largest chunk.
        """
        self._ensure_read()
        self._readers += 1
        try:
            pos = max(from_offset, self._start)
            end = None if follow else self._size
            run_fd, run_end, run_ms = 0, 0, 0
            while True:
                if pos < self._start:  # retention dropped what this reader had not read yet
                    pos, run_end = self._start, 0
                limit = self._size if end is None else min(end, self._size)
                if pos < limit:
                    if pos >= run_end:
                        run_fd, run_end, run_ms = self._run_at(pos)
                    if run_fd == LOST or (only is not None and run_fd != only):
                        pos = min(run_end, limit)
                        continue
                    k, within = divmod(pos, self._seg_size)
                    n = min(chunk_size(), run_end - pos, self._seg_size - within, limit - pos)
                    data = os.pread(self._read_fd(k), n, within)
                    if not data:
                        raise OSError(f"output segment {k} is shorter than the log says")
                    yield Chunk(pos, run_fd, data, run_ms)
                    pos += len(data)
                elif end is not None or self._closed:
                    return
                else:
                    await self._wait()
        finally:
            self._readers -= 1
            if self._closed and self._readers == 0:
                self._close_files()

    def _read_span(self, a: int, b: int) -> bytes:
        """Bytes [a, b) of the retained log, across segment boundaries."""
        parts = []
        while a < b:
            k, within = divmod(a, self._seg_size)
            n = min(b - a, self._seg_size - within)
            parts.append(os.pread(self._read_fd(k), n, within))
            a += n
        return b"".join(parts)

    def tail_offset(self, lines: int, only: int | None = None) -> int:
        """Where the last `lines` lines (of stream `only`, or of both) begin, like `tail -n` / `docker logs --tail`."""
        self._ensure_read()
        if lines <= 0:
            return self._size
        self._readers += 1  # keep the read descriptors while scanning
        try:
            newlines, skip_final = 0, True
            for i in range(self._runs - 1, -1, -1):
                start, fd, _ = self._run_entry(i)
                end = self._run_entry(i + 1)[0] if i + 1 < self._runs else self._size
                start = max(start, self._start)
                if end <= start or fd == LOST or (only is not None and fd != only):
                    continue
                hi = end
                while hi > start:
                    lo = max(start, hi - 65536)
                    block = self._read_span(lo, hi)
                    if skip_final:  # the newline ending the last line does not start another one
                        skip_final = False
                        if block.endswith(b"\n"):
                            block = block[:-1]
                    at = len(block)
                    while True:
                        at = block.rfind(b"\n", 0, at)
                        if at < 0:
                            break
                        newlines += 1
                        if newlines == lines:
                            return lo + at + 1
                    hi = lo
            return self._start
        finally:
            self._readers -= 1
            if self._closed and self._readers == 0:
                self._close_files()
