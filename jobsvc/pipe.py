"""A pipe as two owned ends: each end is closed exactly once, unless its descriptor was handed over."""

from __future__ import annotations

import os
from types import TracebackType


class PipeEnd:
    """One end of a pipe (close-on-exec). close() is idempotent; detach() hands the descriptor to a new owner."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("the pipe end is closed or was handed over")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def detach(self) -> int:
        """The descriptor, now the caller's to close; this end no longer closes it."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> PipeEnd:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def pipe() -> tuple[PipeEnd, PipeEnd]:
    """A new pipe: (read end, write end)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    return PipeEnd(r), PipeEnd(w)
