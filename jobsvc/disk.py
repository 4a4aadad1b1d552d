"""Disk room reserved ahead of the writes that need it (append-only files that must not fail on a full disk)."""

from __future__ import annotations

import ctypes
import os

_FALLOC_FL_KEEP_SIZE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate disk blocks past the end of the file without changing its size (fallocate, KEEP_SIZE)."""
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def has_room(path: str, at_least: int) -> bool:
    """Whether the filesystem holding path has at least this many bytes free for us (root may use the blocks
    reserved for it); True when it cannot be told."""
    try:
        st = os.statvfs(path)
    except OSError:
        return True
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return free * st.f_frsize >= at_least
