"""An exclusive lock on a directory: a lock file held with flock(2), naming the holder's pid."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path


class LockHeldError(RuntimeError):
    """Another process holds the lock; pid is what it wrote in the lock file (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is held by pid {pid}")
        self.path = path
        self.pid = pid


class DirLock:
    """Held from acquire() until release() or the process's end (the kernel drops a flock with its last descriptor).

    flock, not a pid file alone: a pid file outlives a kill -9 and its pid may be reused, while a flock can never
    be stale. The descriptor is close-on-exec, so no helper or job inherits the lock and keeps it after we are gone.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: Path) -> DirLock:
        """Take the lock at once or raise LockHeldError; never waits."""
        # No O_TRUNC: opening must not erase the pid of a holder we have not yet found out about.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            for _ in range(20):  # the holder may have locked the file a moment ago and not written its pid yet
                if pid is not None:
                    break
                time.sleep(0.01)
                pid = _read_pid(fd)
            os.close(fd)
            raise LockHeldError(path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the pid in the message is missing
        return cls(path, fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock; the file stays (unlinking it would race a new holder)
            self._fd = -1


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
