"""Ending every process of a job and removing its groups: the loops both drivers share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterable
from typing import Protocol

FREEZE_TIMEOUT = 0.25  # a task in uninterruptible I/O can keep a group freezing forever
KILL_TIMEOUT = 10.0
REMOVE_ATTEMPTS = 60  # rmdir right after the last task left gives EBUSY; ~2.5 s of retries in all


class Freezable(Protocol):
    """What the freeze -> kill -> thaw loop needs of a group."""

    def pids(self) -> list[int]: ...

    def freeze(self) -> None: ...

    def is_frozen(self) -> bool: ...

    def thaw(self) -> None: ...


def signal_pids(pids: Iterable[int], sig: int) -> int:
    """Send sig to each pid; returns how many were still there to get it."""
    n = 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
            n += 1
    return n


async def kill_until_empty(pids: Callable[[], list[int]], timeout: float = KILL_TIMEOUT) -> bool:
    """SIGKILL whatever pids() lists, again and again, until it lists nothing; False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.001
    while current := pids():
        if loop.time() > deadline:
            return False
        signal_pids(current, signal.SIGKILL)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


async def freeze_kill_thaw(group: Freezable) -> bool:
    """Freeze the group so nothing forks, SIGKILL all, thaw; then a kill loop for what the freeze missed.

    The freeze has a time limit: a task in uninterruptible I/O keeps a group freezing, and killing without the
    freeze is still better than waiting [runc signalAllProcesses].
    """
    if not group.pids():
        return True
    loop = asyncio.get_running_loop()
    try:
        group.freeze()
        deadline = loop.time() + FREEZE_TIMEOUT
        while not group.is_frozen() and loop.time() < deadline:
            await asyncio.sleep(0.001)
        signal_pids(group.pids(), signal.SIGKILL)
    finally:
        group.thaw()
    return await kill_until_empty(group.pids)


async def remove_with_retry(remove: Callable[[], bool]) -> bool:
    """Call remove() until it reports the groups gone, while the kernel says EBUSY (tasks still leaving)."""
    delay = 0.001
    for _ in range(REMOVE_ATTEMPTS):
        if remove():
            return True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return False
