"""Small, exact file operations on cgroupfs."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def write_file(path: Path | str, value: str) -> None:
    """Write with one os.write, so the kernel's refusal (EINVAL, ENODEV...) is raised here, not lost at close.

    O_CREAT changes nothing on cgroupfs (it cannot create files) and lets a plain directory stand in for it in tests.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read_file(path: Path | str) -> str:
    """The whole file, read with plain syscalls: half the cost of open() and its buffered text layers, which
    matters on Get, where a running job's usage is four of these reads."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
    finally:
        os.close(fd)
    return b"".join(parts).decode()


def read_int(path: Path | str) -> int | None:
    """An integer file, or None when it does not exist (a controller feature this kernel lacks)."""
    try:
        return int(read_file(path).strip())
    except FileNotFoundError:
        return None


def read_key(path: Path, key: str) -> int:
    """The value of one "key value" line of a flat-keyed cgroup file; 0 when the file or the key is missing."""
    try:
        text = read_file(path)
    except OSError:
        return 0
    for line in text.splitlines():
        k, _, value = line.partition(" ")
        if k == key:
            return int(value)
    return 0


def read_pids(procs_file: Path | str) -> list[int]:
    """The processes listed in a cgroup.procs file; a vanished group has none."""
    try:
        text = read_file(procs_file)
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split()]


def remove_dir(path: Path) -> bool:
    """rmdir one group; True when it is gone (ENOENT counts), False on EBUSY (tasks still leaving)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise
    return True


def groups_below(path: Path) -> list[Path]:
    """Every group beneath path (a job may make its own when it runs as root), deepest first.

    scandir's entry types come with the directory listing: a group holds 20-30 control files, and a stat of each
    (Path.is_dir) made listing one the main cost of a job's end."""
    found: list[Path] = []
    try:
        with os.scandir(path) as entries:
            subs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return found
    for sub in subs:
        found += groups_below(sub)
        found.append(sub)
    return found


def read_pids_tree(group: Path) -> list[int]:
    """The processes of a group and of every group beneath it."""
    pids = read_pids(group / "cgroup.procs")
    for sub in groups_below(group):
        pids += read_pids(sub / "cgroup.procs")
    return pids


def remove_tree(path: Path) -> bool:
    """Remove a group and all groups below it, deepest first; False if any is still busy.

    The group alone first: a job seldom makes groups of its own, and rmdir refuses (EBUSY) one that still has
    some, so the walk is only paid for when it can find something."""
    if remove_dir(path):
        return True
    ok = True
    for sub in groups_below(path):
        ok = remove_dir(sub) and ok
    return remove_dir(path) and ok
