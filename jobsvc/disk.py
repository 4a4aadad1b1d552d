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
