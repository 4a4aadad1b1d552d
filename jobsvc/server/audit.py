"""The audit log: one JSON line per call in <state dir>/audit.log, append-only, never losing a line silently.

Space for the next lines is reserved ahead of them (fallocate with KEEP_SIZE: blocks allocated past the end of the
file, its size unchanged), so a state disk that fills up (a job's output, another program) cannot take the audit
trail's room. When the reserve can no longer be renewed, calls are refused (UNAVAILABLE, before they run) once
what is left of it runs low; a line that still cannot be written goes to the server log, marked, never nowhere.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from jobsvc import disk
from jobsvc.job import utc_now
from jobsvc.model import format_time

log = logging.getLogger("jobsvc.audit")

RESERVE = 4 << 20  # about 20,000 lines ahead
RENEW_BELOW = 1 << 20
MARGIN = 64 << 10  # what calls already running may still write once new ones are refused


def _open(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def reserve(fd: int, offset: int, length: int) -> None:
    disk.reserve(fd, offset, length)


class AuditLog:
    """Who did what, when, with which outcome. Each line is one os.write on an O_APPEND file (no interleaving)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._low = False  # the reserve could not be renewed
        self._attach(_open(path))

    def _attach(self, fd: int) -> None:
        self._fd = fd
        self._pos = self._reserved = os.fstat(fd).st_size
        self._renew()

    def _renew(self) -> None:
        if self._reserved - self._pos >= RENEW_BELOW:
            return
        end = self._pos + RESERVE
        try:
            reserve(self._fd, self._reserved, end - self._reserved)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):  # no fallocate here: nothing to reserve with
                self._reserved = self._pos + RESERVE
                return
            if not self._low:
                log.error("audit log %s: cannot reserve room for more lines (%s)", self.path, e.strerror)
            self._low = True
            return
        self._reserved, self._low = end, False

    @property
    def accepting(self) -> bool:
        """Whether a new call may run: its line has room."""
        return not self._low or self._reserved - self._pos > MARGIN

    def reopen(self) -> None:
        """Open the path again (after logrotate renamed the file); on failure keep writing to the old file.

        Called on the event loop, like write(), so no line can fall between the two descriptors.
        """
        if self._fd < 0:
            return  # closed: the server is on its way out
        fd = _open(self.path)
        old = self._fd
        self._attach(fd)
        os.close(old)

    def write(self, entry: str) -> None:
        """Append one entry, given as a serialized JSON object (the request log's line), with the time put first."""
        stamp = f'{{"time":"{format_time(utc_now())}"'
        line = stamp + ("}" if entry == "{}" else "," + entry[1:]) + "\n"
        data = line.encode()
        try:
            self._pos += os.write(self._fd, data)
        except OSError as e:  # not silently: the server log keeps it, marked
            log.error("audit line NOT written to %s (%s): %s", self.path, e.strerror, line.rstrip())
            return
        self._renew()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
