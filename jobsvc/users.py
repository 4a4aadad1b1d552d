"""The Unix users jobs run as: a transient uid per job from a reserved range, or one named user by opt-in."""

from __future__ import annotations

import fcntl
import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from jobsvc.errors import InvalidArgumentError, ResourceExhaustedError

# systemd's DynamicUser= range: nothing else on a host should own these ids
DYNAMIC_RANGE = (61184, 65519)


@dataclass(frozen=True)
class JobUser:
    uid: int
    gid: int


class UserPool(Protocol):
    """Where a job's user comes from; every acquire() is matched by one release() when the job has ended."""

    def acquire(self) -> JobUser: ...

    def release(self, user: JobUser) -> None: ...


class FixedUser:
    """One account for every job (`--job-user`): nothing to hand out or give back."""

    def __init__(self, user: JobUser) -> None:
        self.user = user

    def acquire(self) -> JobUser:
        return self.user

    def release(self, user: JobUser) -> None:
        pass


def named_user(name: str) -> JobUser:
    """A fixed account for every job (`--job-user`), e.g. root on a trusted single-user host."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise InvalidArgumentError(f"job user {name!r} does not exist") from None
    return JobUser(entry.pw_uid, entry.pw_gid)


class UidPool:
    """Hands out uids no live job holds, so one job cannot signal, ptrace or read /proc of another.

    A cursor walks the range, so a uid freed now is the last to come back (files a job left in a world-writable
    place are not handed to the next job at once). Ids that /etc/passwd already uses are skipped.

    With lock_dir, the uids are taken host-wide, as systemd takes DynamicUser= ids: a job's uid is held by an
    flock on lock_dir/<uid> for as long as the job lives, so no other jobsvc server on the host (whatever its
    state dir) hands it out meanwhile. A server that dies releases its locks with its descriptors while its jobs
    may still run: a lock file that still names its holder is taken over only once no process has that uid.
    """

    def __init__(
        self, first: int = DYNAMIC_RANGE[0], last: int = DYNAMIC_RANGE[1], lock_dir: Path | None = None
    ) -> None:
        if not 0 < first <= last:
            raise ValueError(f"bad uid range {first}-{last}")
        self._first, self._last = first, last
        self._next = first
        self._in_use: set[int] = set()
        self._reserved = {e.pw_uid for e in pwd.getpwall() if first <= e.pw_uid <= last}
        self._lock_dir = lock_dir
        self._locks: dict[int, int] = {}  # uid -> descriptor holding its host-wide lock
        if lock_dir is not None:
            lock_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(lock_dir, 0o700)

    def acquire(self) -> JobUser:
        size = self._last - self._first + 1
        for i in range(size):
            uid = self._first + (self._next - self._first + i) % size
            if uid not in self._in_use and uid not in self._reserved and self._lock(uid):
                self._in_use.add(uid)
                self._next = uid + 1 if uid < self._last else self._first
                return JobUser(uid, uid)
        raise ResourceExhaustedError(f"all {size} job uids ({self._first}-{self._last}) are in use")

    def _lock(self, uid: int) -> bool:
        if self._lock_dir is None:
            return True
        fd = os.open(self._lock_dir / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another server's live job has it
            os.close(fd)
            return False
        try:
            if os.pread(fd, 64, 0) and uid_has_processes(uid):  # its holder died, its job lives on
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # and with it the lock
            raise
        self._locks[uid] = fd
        return True

    def release(self, user: JobUser) -> None:
        self._in_use.discard(user.uid)
        fd = self._locks.pop(user.uid, None)
        if fd is not None:
            os.ftruncate(fd, 0)  # released on purpose: the next holder need not look for its processes
            os.close(fd)


def uid_has_processes(uid: int, proc: Path = Path("/proc")) -> bool:
    """Whether any process on the host runs with uid as its real, effective, saved or filesystem uid."""
    wanted = str(uid)
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        if wanted.encode() in line.split()[1:]:
                            return True
                        break
        except OSError:
            continue
    return False
