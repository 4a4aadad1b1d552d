"""OutputLog: a job's output on disk, append-only, one writer and any number of readers by byte offset.

Layout of a log directory:
  <segment number>.seg  raw output bytes; segment k holds global offsets [k * S, (k + 1) * S)
  index                 16-byte records (offset of a run's first byte, fd), one per change of stream
The bytes live in the page cache, not in the server: readers hold only an offset (memory does not grow with output),
and the writer never waits for a reader. Retention can drop whole old segments without touching live ones.
"""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

STDOUT = 1
STDERR = 2
CHUNK_SIZE = 256 * 1024  # the largest Stream message; bigger ones gain nothing and cost memory
SEGMENT_SIZE = 64 * 1024 * 1024
_RUN = struct.Struct("<QB7x")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int  # global offset of data[0] in the job's output
    fd: int  # STDOUT or STDERR
    data: bytes


class OutputLog:
    """A job's output; write with append()/splice_from() then notify(); read with follow()."""

    def __init__(self, directory: Path, segment_size: int = SEGMENT_SIZE) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._dir = directory
        self._seg_size = segment_size
        self._index_fd = -1
        self._size = 0
        self._start = 0  # oldest retained byte
        self._runs = 0
        self._last_run_start = 0
        self._last_fd = 0
        self._wseg = -1
        self._wfd = -1
        self._read_fds: dict[int, int] = {}
        self._readers = 0
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self.lost_bytes = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def start(self) -> int:
        return self._start

    @property
    def closed(self) -> bool:
        return self._closed

    # -- writer -----------------------------------------------------------------------------------------------------

    def _segment_path(self, k: int) -> Path:
        return self._dir / f"{k:012d}.seg"

    def _write_target(self) -> tuple[int, int, int]:
        """(fd, position in segment, room left) for the next byte."""
        k, pos = divmod(self._size, self._seg_size)
        if k != self._wseg:
            if self._wfd >= 0:
                os.close(self._wfd)
            self._wfd = os.open(self._segment_path(k), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._wseg = k
        return self._wfd, pos, self._seg_size - pos

    def _index(self) -> int:
        # Opened on demand and closed with the log, so thousands of ended jobs hold no descriptors.
        if self._index_fd < 0:
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            self._index_fd = os.open(self._dir / "index", flags, 0o600)
        return self._index_fd

    def _grow(self, fd_tag: int, n: int) -> None:
        if fd_tag != self._last_fd:
            os.write(self._index(), _RUN.pack(self._size, fd_tag))
            self._runs += 1
            self._last_fd = fd_tag
            self._last_run_start = self._size
        self._size += n

    def append(self, fd_tag: int, data: bytes) -> None:
        """Append bytes read from stream fd_tag (call notify() once after a batch)."""
        view = memoryview(data)
        while view:
            wfd, pos, room = self._write_target()
            n = os.pwrite(wfd, view[:room], pos)
            self._grow(fd_tag, n)
            view = view[n:]

    def splice_from(self, fd_tag: int, pipe_fd: int, limit: int) -> int:
        """Move up to limit bytes from a non-blocking pipe into the log without copying through Python.

        Returns 0 at EOF; raises BlockingIOError when the pipe is empty.
        """
        wfd, pos, room = self._write_target()
        n = os.splice(pipe_fd, wfd, min(limit, room), offset_dst=pos, flags=_SPLICE_FLAGS)
        if n:
            self._grow(fd_tag, n)
        return n

    def notify(self) -> None:
        """Wake every waiting reader (once per batch of appends, not per chunk)."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """No more output: readers end after the last byte."""
        self._closed = True
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1
        self.notify()
        if self._readers == 0:
            self._close_files()

    # -- readers ----------------------------------------------------------------------------------------------------

    def _run_entry(self, i: int) -> tuple[int, int]:
        if i == self._runs - 1:
            return self._last_run_start, self._last_fd
        start, fd = _RUN.unpack(os.pread(self._index(), _RUN.size, i * _RUN.size))
        return start, fd

    def _run_at(self, pos: int) -> tuple[int, int]:
        """(fd, end offset) of the run holding pos (end is the log size for the last run)."""
        lo, hi = 0, self._runs - 1
        while lo < hi:  # the last run starting at or before pos
            mid = (lo + hi + 1) // 2
            if self._run_entry(mid)[0] <= pos:
                lo = mid
            else:
                hi = mid - 1
        _, fd = self._run_entry(lo)
        end = self._run_entry(lo + 1)[0] if lo + 1 < self._runs else self._size
        return fd, end

    def _read_fd(self, k: int) -> int:
        fd = self._read_fds.get(k)
        if fd is None:
            fd = os.open(self._segment_path(k), os.O_RDONLY | os.O_CLOEXEC)
            self._read_fds[k] = fd
        return fd

    def _close_files(self) -> None:
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        if self._index_fd >= 0:
            os.close(self._index_fd)
            self._index_fd = -1

    async def _wait(self) -> None:
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        # shield: one reader's cancellation must not cancel the future every reader shares
        await asyncio.shield(self._waiter)

    async def follow(self, from_offset: int = 0) -> AsyncIterator[Chunk]:
        """Everything from from_offset (or the oldest retained byte), then live output until the log closes."""
        self._readers += 1
        try:
            pos = max(from_offset, self._start)
            run_fd, run_end = 0, 0
            while True:
                if pos < self._size:
                    if pos >= run_end:
                        run_fd, run_end = self._run_at(pos)
                    k, within = divmod(pos, self._seg_size)
                    n = min(CHUNK_SIZE, run_end - pos, self._seg_size - within)
                    data = os.pread(self._read_fd(k), n, within)
                    if not data:
                        raise OSError(f"output segment {k} is shorter than the log says")
                    yield Chunk(pos, run_fd, data)
                    pos += len(data)
                elif self._closed:
                    return
                else:
                    await self._wait()
        finally:
            self._readers -= 1
            if self._closed and self._readers == 0:
                self._close_files()
