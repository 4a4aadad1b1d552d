"""The audit log: one JSON line per call in <state dir>/audit.log, append-only."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from jobsvc.job import utc_now
from jobsvc.model import format_time


def _open(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


class AuditLog:
    """Who did what, when, with which outcome. Each line is one os.write on an O_APPEND file (no interleaving)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = _open(path)

    def reopen(self) -> None:
        """Open the path again (after logrotate renamed the file); on failure keep writing to the old file.

        Called on the event loop, like write(), so no line can fall between the two descriptors.
        """
        if self._fd < 0:
            return  # closed: the server is on its way out
        fd = _open(self.path)
        old, self._fd = self._fd, fd
        os.close(old)

    def write(self, entry: str) -> None:
        """Append one entry, given as a serialized JSON object (the request log's line), with the time put first."""
        stamp = f'{{"time":"{format_time(utc_now())}"'
        line = stamp + ("}" if entry == "{}" else "," + entry[1:]) + "\n"
        with contextlib.suppress(OSError):  # a full disk must not fail the call; the server log has the line too
            os.write(self._fd, line.encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
